"""What the commands print: tables of results and the end-of-run summary, from run records."""

from __future__ import annotations

__all__ = ["print_table", "format_metric", "print_results", "print_run"]


def format_metric(res: dict) -> tuple[str, str, str, str]:
    """(metric name, value, 95% interval, n) for the table (see :func:`safeptq.eval.metrics.format_metric`)."""
    from ..eval.metrics import format_metric as fmt

    return fmt(res)


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


def print_results(results: dict) -> None:
    print_table([[name, *format_metric(res)] for name, res in results.items()],
                ["suite", "metric", "value", "95% CI", "n"])


def _aaq_lines(doc: dict) -> None:
    loss, ph, refs = doc["loss"], doc["phases"], doc["references"]

    def terms(t):
        return ", ".join(f"{k} {v:.4g}" for k, v in (t or {}).items())

    print(f"AAQ {doc['formula']}")
    print(f"loss start: {terms(loss['terms_start'])}")
    print(f"loss end:   {terms(loss['terms_end'])}")
    where = "live (no cache)" if refs["mode"] == "live" else f"{'reused' if refs['reused'] else 'built'} {refs['path']}"
    print(f"references: {where}; phases: references {ph['references']['wall_time_s']} s, peak RSS "
          f"{ph['references']['peak_rss_mb']} MiB; training {ph['training']['wall_time_s']} s, peak RSS "
          f"{ph['training']['peak_rss_mb']} MiB")


def print_run(doc: dict) -> None:
    """The end-of-run summary of a quantize / realign / aaq run record."""
    if doc["recipe"]["method"] == "aaq":
        _aaq_lines(doc)
    report = doc.get("calibration") or {}
    blocks = report.get("blocks") or []
    if blocks:
        def f(x):
            return "-" if x is None else f"{x:.4g}"

        print_table([[b["block"], b["epochs"], f(b["loss_first"]), f(b["loss_last"]), b["seconds"]] for b in blocks],
                    ["block", "epochs", "loss first", "loss last", "s"])
        if report.get("resumed_from_block"):
            print(f"(resumed at block {report['resumed_from_block']})")
    if doc.get("eval"):
        print_results(doc["eval"])
    ex, v = doc["export"], doc["verify"]
    bpw = ex["bits_per_weight"]
    print(f"{doc['recipe']['method']} {doc['scheme']['name']}: {ex['format']}"
          f"{' (dense fake-quant, not a serving format)' if ex['fake_quant'] else ''}, "
          f"{'' if bpw is None else f'{bpw:.2f} bits/weight, '}reload max rel err {v['max_rel_err']:.2g}, "
          f"{doc['wall_time_s']} s, peak RSS {doc['peak_rss_mb']:.0f} MiB")
    print(f"quantized model written to {ex['path']}")
