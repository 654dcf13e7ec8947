"""What the throughput benchmarks share about where they run: the `--device` option, the device it names, a
synchronize around timed calls (CUDA launches are asynchronous) and a one-line description of the machine."""

from __future__ import annotations

import argparse
import platform

import torch


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def chosen_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{threads} threads, {platform.processor() or platform.machine()}"
