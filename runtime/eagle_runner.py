"""The command line and the report of ``eagle_runner`` (runtime/eagle/, built into .runner/ by
tools/build_executor_runner.sh): greedy EAGLE-3 speculative decoding on ExecuTorch's runtime.

``EagleRun`` holds one invocation's flags; ``parse_reports`` reads the runner's standard output,
one ``Report`` per prompt and run.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ["EagleRun", "Report", "ReportError", "parse_reports"]


@dataclasses.dataclass(frozen=True)
class EagleRun:
    model_path: Path
    data_path: Path | None = None
    prompts_file: Path | None = None  # one prompt per line; or
    prompt: Sequence[int] = ()
    max_new_tokens: int = 64
    eos_id: int = -1
    mode: str = "speculative"  # or "greedy"
    decode_method: str = "target_verify"
    forced_accept: Sequence[int] = ()
    reference_file: Path | None = None
    cuda_graph_methods: Sequence[str] = ()
    repeat: int = 1

    def flags(self) -> list[str]:
        if self.mode not in ("speculative", "greedy"):
            raise ValueError(f"mode {self.mode!r}: expected 'speculative' or 'greedy'")
        if (self.prompts_file is None) == (not self.prompt):
            raise ValueError("give exactly one of prompt and prompts_file")
        if self.repeat < 1:
            raise ValueError(f"repeat {self.repeat} must be at least 1")
        if self.forced_accept and self.reference_file is None:
            raise ValueError("forced_accept needs reference_file (the prompts' reference continuations)")
        flags = [f"--model_path={self.model_path}", f"--max_new_tokens={self.max_new_tokens}",
                 f"--eos_id={self.eos_id}", f"--mode={self.mode}", f"--decode_method={self.decode_method}",
                 f"--repeat={self.repeat}"]
        optional = {
            "data_path": self.data_path,
            "prompts_file": self.prompts_file,
            "prompt": " ".join(map(str, self.prompt)),
            "forced_accept": ",".join(map(str, self.forced_accept)),
            "reference_file": self.reference_file,
            "cuda_graph_methods": ",".join(self.cuda_graph_methods),
        }
        return flags + [f"--{name}={value}" for name, value in optional.items() if value]


@dataclasses.dataclass(frozen=True)
class MethodTimes:
    calls: int
    median_ms: float
    mean_ms: float


@dataclasses.dataclass(frozen=True)
class Report:
    prompt: int
    run: int
    tokens: list[int]
    stop: str  # max_new_tokens, end_token or kv_cache_full
    tokens_per_s: float  # tokens of the decode loop (all but the first) per second after prefill
    prefill: MethodTimes
    decode: MethodTimes | None  # greedy mode
    verify: MethodTimes | None  # speculative mode
    draft: MethodTimes | None
    mean_accepted: float | None  # drafts accepted per verify
    histogram: dict[int, int] | None  # accepted drafts -> verifies


class ReportError(ValueError):
    """The runner's output is not the report this module reads."""


_HEADER = re.compile(r"^== prompt (\d+) run (\d+): \d+ tokens$")
_FIELD = re.compile(r"^(tokens|stop|decode_rate|prefill|decode|verify|draft|accepted|histogram):(.*)$")
_TIMES = re.compile(r"(\d+) calls(?:, median ([0-9.]+) ms, mean ([0-9.]+) ms)?")
_RATE = re.compile(r"\d+ tokens in [0-9.]+ s, ([0-9.]+) tokens/s")


def _times(text: str | None) -> MethodTimes | None:
    if text is None:
        return None
    match = _TIMES.search(text)
    if not match:
        raise ReportError(f"no call times in {text!r}")
    calls, median, mean = match.groups()
    return MethodTimes(int(calls), float(median or 0), float(mean or 0))


def _report(prompt: int, run: int, fields: dict[str, str]) -> Report:
    for key in ("tokens", "stop", "decode_rate", "prefill"):
        if key not in fields:
            raise ReportError(f"prompt {prompt} run {run}: the report has no '{key}:' line")
    rate = _RATE.fullmatch(fields["decode_rate"])
    if not rate:
        raise ReportError(f"decode_rate {fields['decode_rate']!r} is not 'N tokens in S s, R tokens/s'")
    histogram = None
    if "histogram" in fields:
        histogram = {int(a): int(n) for a, n in (pair.split(":") for pair in fields["histogram"].split())}
    accepted = re.match(r"mean ([0-9.]+)", fields.get("accepted", ""))
    return Report(
        prompt=prompt, run=run, tokens=[int(t) for t in fields["tokens"].split()], stop=fields["stop"],
        tokens_per_s=float(rate.group(1)), prefill=_times(fields["prefill"]), decode=_times(fields.get("decode")),
        verify=_times(fields.get("verify")), draft=_times(fields.get("draft")),
        mean_accepted=float(accepted.group(1)) if accepted else None, histogram=histogram)


def parse_reports(output: str) -> list[Report]:
    """The reports in ``output`` (the runner's stdout; lines before the first header are ignored)."""
    reports, current, fields = [], None, {}
    for line in output.splitlines():
        header = _HEADER.match(line)
        if header:
            if current is not None:
                reports.append(_report(*current, fields))
            current, fields = (int(header.group(1)), int(header.group(2))), {}
        elif current is not None and (field := _FIELD.match(line)):
            fields[field.group(1)] = field.group(2).strip()
    if current is not None:
        reports.append(_report(*current, fields))
    if not reports:
        raise ReportError("no '== prompt' report in the runner's output")
    return reports
