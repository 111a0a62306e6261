"""The machine a benchmark's figures belong to: the CPU's name and kind, cores, load.

Figures differ between CPU kinds (AVX2-only Zen 3, Zen 4 with AVX512-BF16, Intel with AMX),
so every benchmark prints this line beside them.
"""

from __future__ import annotations

import os
import subprocess

KIND_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """lscpu's "Model name" ("unknown CPU" where lscpu is missing)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.startswith("Model name")]
    return names[0] if names else "unknown CPU"


def cpu_flags() -> list[str]:
    """Which of `KIND_FLAGS` the CPU has (from /proc/cpuinfo; empty where it is missing)."""
    from caption_attn.quiet import cpu_flags as all_flags

    flags = all_flags()
    return [flag for flag in KIND_FLAGS if flag in flags]


def describe() -> str:
    """One line: CPU name, kind flags, cores, load average (1 min); the oneDNN cap,
    TF_ENABLE_ONEDNN_OPTS and the XLA flags where set (decoding sets XLA's vector width on
    some CPUs)."""
    flags = " ".join(cpu_flags()) or "flags unknown"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    limit = f", oneDNN limited to {isa}" if isa else ""
    # set by the user or, on AVX2-only CPUs, by `import_tensorflow`
    opts = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    opts_note = f", TF_ENABLE_ONEDNN_OPTS={opts}" if opts else ""
    xla = os.environ.get("XLA_FLAGS")
    xla = f", XLA_FLAGS {xla}" if xla else ""
    return (f"CPU: {cpu_name()} ({flags}{limit}{opts_note}), {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f}{xla}")


def check_precisions(parser, flag: str, precisions) -> None:
    """`parser.error` (exit 2) for a precision whose ops would abort this process:
    oneDNN capped below its kernels (`backbone.refuse_aborting_precision`, as the CLI)."""
    from caption_attn.backbone import refuse_aborting_precision
    from caption_attn.errors import UserError

    try:
        for precision in precisions:
            refuse_aborting_precision(precision, f"{flag} {precision}", "use float32")
    except UserError as e:
        parser.error(str(e))


def interleaved(rounds: int, *timers, swap: bool = False) -> list[list]:
    """Each timer called once per round, in turn (ours, reference, ours, ...), so that a
    spell of other load on the machine hits both sides alike: one list of results per timer.
    With `swap`, odd rounds call them in reverse order, so that no side always runs first
    (after the same other one). The benchmarks report each side's best round: interference
    only ever slows a round down (as `timeit` takes the minimum)."""
    results = [[] for _ in timers]
    for r in range(rounds):
        order = list(zip(results, timers))
        for out, timer in (order[::-1] if swap and r % 2 else order):
            out.append(timer())
    return results


def run_in_temp_folder(prefix: str, measure, args, report=None) -> int:
    """`measure(args, folder)` in a temporary folder removed afterwards (whatever happens);
    then `report(figures)` and, with `args.json`, the figures written as JSON. Exit code 0."""
    import shutil
    import tempfile

    from caption_attn.fileio import write_json_atomic

    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        figures = measure(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if report is not None:
        report(figures)
    if args.json:
        write_json_atomic(args.json, figures)
    return 0
