"""``python -m mactuner devices …``: the device manager without the browser.

The ``--json`` answers have the shapes of the original HTTP API (SPEC.md):
``list`` ↔ ``GET devices/available``, ``select``/``auto-select`` ↔ ``POST
devices/select/{type}`` / ``POST devices/auto-select``, ``current``, ``memory``,
``clear-cache`` and ``health``. ``select`` and ``auto-select`` remember the
choice in the settings file as the default for later commands and new app
sessions. A bad device exits with 1 and a one-line reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from mactuner import devices as dev
from mactuner.settings import load_settings, remember_device

HELP = "list, select and inspect compute devices (memory, cache, health)"

ACTIONS = {
    "list": "list every detected device",
    "select": "probe and remember a device (cpu, mps, cuda, cuda:N)",
    "current": "show the default device (remembered, or chosen automatically)",
    "auto-select": "choose the best device (MPS > CUDA > CPU) and remember it",
    "memory": "memory of a device",
    "clear-cache": "garbage-collect and empty a device's cache",
    "health": "versions, backends, a timed test of each device, advice",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``ACTION [DEVICE] [--device D] [--priority …] [--json] [-v]``."""
    parser.add_argument("action", choices=list(ACTIONS), help="; ".join(f"{k}: {v}" for k, v in ACTIONS.items()))
    parser.add_argument("device", nargs="?", help="device for select (cpu, mps, cuda, cuda:N)")
    parser.add_argument("--device", dest="device_option", help="device for memory / clear-cache (default: current)")
    parser.add_argument("--priority", help="auto-select order, e.g. cuda,mps,cpu (default mps,cuda,cpu)")
    parser.add_argument("--json", action="store_true", help="print the original API's JSON answer")
    parser.add_argument("-v", "--verbose", action="store_true", help="log detection steps to stderr")


def run(args: argparse.Namespace) -> int:
    """Run one ``devices`` action; returns the exit code."""
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    manager = dev.DeviceManager()
    try:
        return ACTION_FUNCTIONS[args.action](manager, args)
    except (dev.DeviceUnavailableError, ValueError) as exc:
        if args.json:
            print(json.dumps({"success": False, "error": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _emit(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2) if args.json else text)


def _current(manager: dev.DeviceManager) -> tuple:
    """The default device and where it came from: remembered in settings, or automatic."""
    remembered = load_settings().default_device
    if remembered:
        try:
            return manager.select_device(remembered), "settings"
        except dev.DeviceUnavailableError as exc:
            print(f"warning: remembered device {remembered} is not usable ({exc}); choosing automatically", file=sys.stderr)
    return manager.auto_select_device(), "auto"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _gb(value) -> str:
    return "-" if value is None else f"{value:.1f} GB"


def do_list(manager: dev.DeviceManager, args) -> int:
    found = manager.get_available_devices()
    remembered = load_settings().default_device
    rows = [["", "DEVICE", "NAME", "MEMORY", "CAPABILITY", "DTYPE", "STATUS"]]
    for info in found:
        dtype = dev.dtype_name(dev.get_optimal_dtype(info.key)) if info.is_available else "-"
        rows.append(
            [
                "*" if info.key == remembered else "",
                info.key,
                info.name,
                _gb(dev.to_gb(info.memory_total)),
                info.compute_capability or "-",
                dtype,
                "available" if info.is_available else f"unavailable: {info.reason}",
            ]
        )
    footer = f"\n{len(found)} device{'s' if len(found) != 1 else ''}" + ("  (* remembered default)" if remembered else "")
    _emit(args, {"devices": [info.to_json() for info in found], "count": len(found)}, _table(rows) + footer)
    return 0


def _selection_answer(requested: str, device, how: str) -> dict:
    return {
        "success": True,
        "selected_device": requested,
        "current_device": str(device),
        "dtype": dev.dtype_name(dev.get_optimal_dtype(device)),
        "message": f"Device {device} {how} and remembered as the default.",
    }


def do_select(manager: dev.DeviceManager, args) -> int:
    if not args.device:
        raise ValueError("say which device to select, e.g. `devices select cuda:0`")
    device = manager.select_device(args.device)
    remember_device(str(device))
    answer = _selection_answer(args.device, device, "selected")
    _emit(args, answer, answer["message"])
    return 0


def do_auto_select(manager: dev.DeviceManager, args) -> int:
    priority = [p.strip() for p in args.priority.split(",") if p.strip()] if args.priority else None
    if priority:
        unknown = [p for p in priority if p not in dev.DEVICE_TYPES]
        if unknown:
            raise ValueError(f"--priority may list only mps, cuda, cpu; got {', '.join(unknown)}")
    device = manager.auto_select_device(priority)
    remember_device(str(device))
    answer = _selection_answer(device.type, device, "auto-selected")
    _emit(args, answer, answer["message"])
    return 0


def do_current(manager: dev.DeviceManager, args) -> int:
    device, source = _current(manager)
    info = manager.get_device_info(device)
    data = {
        **info.to_json(manager.get_device_memory_info(device)),
        "dtype": dev.dtype_name(dev.get_optimal_dtype(device)),
        "source": source,
    }
    how = "remembered default" if source == "settings" else "chosen automatically; `devices select` remembers one"
    _emit(args, data, f"{device}  {info.name}  ({how})\ndtype: {data['dtype']}")
    return 0


def _target(manager: dev.DeviceManager, args):
    if args.device_option or args.device:
        return manager.select_device(args.device_option or args.device)
    return _current(manager)[0]


def do_memory(manager: dev.DeviceManager, args) -> int:
    device = _target(manager, args)
    data = dev.memory_json(device, manager.get_device_memory_info(device))
    rows = [["", "GB"]] + [[key, _gb(data[key])] for key in ("allocated", "reserved", "used", "total", "available")]
    _emit(args, data, f"memory of {device}\n" + _table(rows))
    return 0


def do_clear_cache(manager: dev.DeviceManager, args) -> int:
    device = _target(manager, args)
    result = manager.clear_cache(device)
    _emit(args, result.to_json(), result.message)
    return 0


def do_health(manager: dev.DeviceManager, args) -> int:
    report = manager.health()
    lines = [f"status: {report['status']}"]
    lines += [f"{name}: {value}" for name, value in report["versions"].items()]
    cuda, mps = report["backends"]["cuda"], report["backends"]["mps"]
    lines.append(f"CUDA: built={cuda['built']} version={cuda['version']} available={cuda['available']} GPUs={cuda['device_count']}")
    lines.append(f"MPS: built={mps['built']} available={mps['available']}")
    lines.append("")
    rows = [["DEVICE", "OK", "DTYPE", "FLOAT32 MATMUL", "SPEEDUP", "ERROR"]]
    for probe in report["devices"]:
        rows.append(
            [
                probe["device"],
                "yes" if probe["ok"] else "NO",
                probe.get("dtype", "-"),
                f"{probe['float32_ms']} ms" if "float32_ms" in probe else "-",
                f"{probe['speedup_vs_float32']}x" if "speedup_vs_float32" in probe else "-",
                probe.get("error") or "",
            ]
        )
    lines.append(_table(rows))
    set_env = {k: v for k, v in report["environment"].items() if v is not None}
    if set_env:
        lines += ["", "environment:"] + [f"  {k}={v}" for k, v in set_env.items()]
    if report["advice"]:
        lines += ["", "advice:"] + [f"  - {a}" for a in report["advice"]]
    lines += ["", "troubleshooting:"] + [f"  - {t}" for t in report["tips"]]
    _emit(args, report, "\n".join(lines))
    return 0 if report["status"] == "ok" else 1


ACTION_FUNCTIONS = {
    "list": do_list,
    "select": do_select,
    "current": do_current,
    "auto-select": do_auto_select,
    "memory": do_memory,
    "clear-cache": do_clear_cache,
    "health": do_health,
}
