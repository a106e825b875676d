"""What a benchmark run records: its rows (one measured quantity each, both sides and a target)
and the machine figures and training rates later sections compare against."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One measured quantity. `ours`/`ref` are the two sides (for `data`: the pipeline and the
    rate the training step consumes); ratio is ours / ref; `met` is None where there is no target."""

    section: str
    case: str
    dtype: str
    metric: str
    ours: float
    ref: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        return self.ours / self.ref if self.ref else None


@dataclass
class Run:
    smoke: bool
    rows: list[Row] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    train_rates: dict = field(default_factory=dict)  # (case, dtype) -> our images/s, for the data section
    slow_bf16: bool | None = None  # None: decided by bf16_is_slow from this run's matmul peaks

    def bf16_is_slow(self) -> bool:
        """Whether bf16 matmuls run slower than fp32 here (CPUs without AVX512-BF16/AMX, ~200x):
        the bf16 rows then run capped shapes and repeats, noted in each row."""
        if self.slow_bf16 is None:
            self.slow_bf16 = self.machine["bf16_peak"] < self.machine["fp32_peak"]
        return self.slow_bf16

    def add(self, *args, **kwargs) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        print(f"  {row.section:8s} {row.case:24s} {row.dtype:5s} {row.metric:34s} ours={row.ours:.4g}"
              + (f" ref={row.ref:.4g} ratio={row.ratio:.3g}" if row.ref else "")
              + (f" target {row.target}: {'met' if row.met else 'NOT met'}" if row.met is not None else ""),
              flush=True)
        return row


def target_row(run: Run, section, case, dtype, metric, times_or_rates: dict, target: float | None,
               higher_is_better: bool = True, note: str = "") -> Row:
    """A row comparing the "mmfusion" and "transformers" entries, its ratio checked against `target`."""
    ours, ref = times_or_rates["mmfusion"], times_or_rates["transformers"]
    met = None
    if target is not None:
        ratio = ours / ref
        met = ratio >= target if higher_is_better else ratio <= target
    text = "" if target is None else (f">= {target:g}x" if higher_is_better else f"<= {target:g}x")
    return run.add(section, case, dtype, metric, ours, ref, text, met, note)


def mfu_rows(run: Run, case: str, dtype: str, flops: float, step_s: dict[str, float], target: float | None) -> None:
    """The utilization row of a training step: model FLOPs / step time / this run's matmul peak."""
    peak = run.machine["bf16_peak" if dtype == "bf16" else "fp32_peak"]
    mfu = {k: flops / t / 1e9 / peak * 100 for k, t in step_s.items()}
    row = run.add("mfu", case, dtype, f"% of {dtype} matmul peak", mfu["mmfusion"], mfu["transformers"],
                  "" if target is None else f"ours >= {target:g}%",
                  None if target is None else mfu["mmfusion"] >= target,
                  note=f"{flops / 1e9:.1f} GFLOP/step, peak {peak:.1f} GFLOP/s")
    row.note += f"; achieved {flops / step_s['mmfusion'] / 1e9:.2f} vs {flops / step_s['transformers'] / 1e9:.2f} GFLOP/s"
