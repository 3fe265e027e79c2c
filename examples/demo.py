"""Demo: raw versus smoothed training loss of a tiny model (plain PyTorch, CPU).

Run: python examples/demo.py
"""

from __future__ import annotations

from plain_loop import train

if __name__ == "__main__":
    for log in train():
        print(f"step={log.step:3d} raw={log.raw:8.4f} smoothed={log.smoothed:8.4f}")
