"""Demo: raw versus smoothed training loss of a tiny model (plain PyTorch, CPU)."""

from __future__ import annotations

from plain_loop import train

if __name__ == "__main__":
    for step, raw, smooth in train():
        print(f"step={step:3d} raw={raw:8.4f} smoothed={smooth:8.4f}")
