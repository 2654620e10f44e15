"""The loop's report: what the stack's topics say happened, as Markdown with PNG plots.

:class:`LoopEvents` reads every event of the loop from the stack's Kafka topics
(dataset versions, trainings, studies, compressions, rollout transitions, health
windows, drift alerts). :func:`write_report` turns them (and, from ``cdl demo``,
what its clients saw) into ``report.md``, ``summary.json`` and five plots:
accuracy per model version, the variants' size and latency, freshness per
version, traffic share over time and the drift statistic over time.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdl.events import Topics
from cdl.v1 import events_pb2

__all__ = ["ClientSample", "Freshness", "LoopEvents", "LoopView", "freshness", "write_report"]

LOOP_TOPICS = (
    Topics.DATA_UPDATED,
    Topics.MODEL_TRAINED,
    Topics.TUNING_COMPLETED,
    Topics.MODEL_COMPRESSED,
    Topics.MODEL_DEPLOYED,
)

STATE = {v: k.removeprefix("ROLLOUT_STATE_").lower() for k, v in events_pb2.RolloutState.items()}


@dataclass(frozen=True)
class ClientSample:
    """One request a demo client sent through the gateway."""

    t: float
    version: int  # 0: failed
    ok: bool
    latency_ms: float
    correct: bool
    shifted: bool


@dataclass
class LoopView:
    """The loop's events, grouped (all times are Unix seconds)."""

    start: float = 0.0
    versions: list[tuple[float, events_pb2.DataUpdated]] = field(default_factory=list)
    trained: dict[int, tuple[float, events_pb2.ModelTrained]] = field(default_factory=dict)
    compressed: dict[int, tuple[float, events_pb2.ModelCompressed]] = field(default_factory=dict)
    deployed: list[tuple[float, events_pb2.ModelDeployed]] = field(default_factory=list)
    health: list[tuple[float, events_pb2.ModelHealth]] = field(default_factory=list)
    alerts: list[tuple[float, events_pb2.DriftDetected]] = field(default_factory=list)
    tunings: list[tuple[float, events_pb2.TuningCompleted]] = field(default_factory=list)
    #: compression.json's duration_s per model version, when the object store was read
    compress_s: dict[int, float] = field(default_factory=dict)

    def rollout(self, version: int) -> tuple[str, str, float]:
        """The newest (state, reason, traffic share) of ``version``."""
        for _, d in reversed(self.deployed):
            if d.version == version:
                return STATE.get(d.state, str(d.state)), d.reason, d.traffic_fraction
        return "", "", 0.0

    def feedback_accuracy(self, version: int) -> tuple[float | None, int]:
        """The score on feedback (accuracy, or R²: the windows' weighted by their labels) over every
        health window of ``version``, and its label count."""
        n = sum(h.feedback for _, h in self.health if h.version == version)
        if not n:
            return None, 0
        return sum(h.score * h.feedback for _, h in self.health if h.version == version) / n, n

    @property
    def metric(self) -> str:
        """What the versions' scores are: ``accuracy``, or ``r2`` for a regression."""
        return next((t.metric for _, t in reversed(self.trained.values()) if t.metric), "accuracy")

    def latency(self, version: int) -> tuple[float | None, float | None]:
        """p50 and p99 (ms) of ``version``'s newest window with requests."""
        for _, h in reversed(self.health):
            if h.version == version and h.requests:
                return h.latency_p50_ms, h.latency_p99_ms
        return None, None

    def serving(self) -> int:
        """The version promoted last (or the only one serving)."""
        for _, d in reversed(self.deployed):
            if d.state == events_pb2.ROLLOUT_STATE_PROMOTED:
                return int(d.version)
        return 0


class LoopEvents:
    """Every loop event of one model, read from the stack's topics from the beginning."""

    def __init__(self, bootstrap: str, model: str) -> None:
        from cdl_tools.stack._watch import HealthReader

        self.model = model
        self.reader = HealthReader(bootstrap, also=LOOP_TOPICS, keep=True)

    def poll(self, timeout_s: float = 1.0) -> None:
        self.reader.poll(timeout_s)

    def view(self, store: Any = None, start: float = 0.0) -> LoopView:
        """The events so far (``store``: an ObjectStore to read compression times from)."""
        v = LoopView(start=start)
        seen: set[tuple[object, ...]] = set()  # the monitor is at-least-once: a re-sent window counts once
        for _topic, ts, pl in self.reader.history:
            if isinstance(pl, events_pb2.ModelHealth | events_pb2.DriftDetected):
                key: tuple[object, ...] = (type(pl).__name__, pl.model, int(pl.version))
                if isinstance(pl, events_pb2.ModelHealth):  # one alert per model version, a window per end
                    key = (*key, pl.window_end.ToNanoseconds())
                if key in seen:
                    continue
                seen.add(key)
            model = getattr(pl, "model", getattr(pl, "dataset", None))
            if model != self.model:
                continue
            if isinstance(pl, events_pb2.DataUpdated):
                v.versions.append((ts, pl))
            elif isinstance(pl, events_pb2.ModelTrained):
                v.trained[int(pl.version)] = (ts, pl)
            elif isinstance(pl, events_pb2.ModelCompressed):
                v.compressed[int(pl.version)] = (ts, pl)
            elif isinstance(pl, events_pb2.ModelDeployed):
                v.deployed.append((ts, pl))
            elif isinstance(pl, events_pb2.ModelHealth):
                v.health.append((ts, pl))
            elif isinstance(pl, events_pb2.DriftDetected):
                v.alerts.append((ts, pl))
            elif isinstance(pl, events_pb2.TuningCompleted):
                v.tunings.append((ts, pl))
        if store is not None:
            from cdl.registry import MODELS_BUCKET

            for version in v.compressed:
                try:
                    doc = store.get_json(MODELS_BUCKET, f"{self.model}/{version}/compression.json")
                    v.compress_s[version] = float(doc.get("duration_s", 0.0))
                except Exception:  # noqa: BLE001 - a missing document leaves the figure out
                    continue
        return v

    def close(self) -> None:
        self.reader.close()


# --------------------------------------------------------------------------- freshness


@dataclass(frozen=True)
class Freshness:
    """From the record that fired a dataset version to a model trained on it answering."""

    dataset_version: int
    model_version: int
    total_s: float
    train_s: float
    compress_s: float

    @property
    def compute_s(self) -> float:
        return self.train_s + self.compress_s

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.compute_s)


def freshness(view: LoopView, fired: dict[int, float], answered: dict[int, float] | None) -> list[Freshness]:
    """One row per model version that answered: ``fired`` maps dataset versions to the time
    of the record that fired them (default: the version's event), ``answered`` model versions
    to their first answer to a client (None: their first transition with traffic, as the
    gateway recorded it)."""
    cut = {int(u.version): ts for ts, u in view.versions}
    first_traffic: dict[int, float] = {}
    for ts, d in view.deployed:
        if d.traffic_fraction > 0 or d.state == events_pb2.ROLLOUT_STATE_PROMOTED:
            first_traffic.setdefault(int(d.version), ts)
    rows = []
    for mv, (_, t) in sorted(view.trained.items()):
        dv = int(t.lineage.dataset_version)
        start = fired.get(dv, cut.get(dv))
        end = first_traffic.get(mv) if answered is None else answered.get(mv)
        if start is None or end is None or mv not in view.compress_s:
            continue
        rows.append(Freshness(dv, mv, end - start, float(t.lineage.duration_s), view.compress_s[mv]))
    return rows


# --------------------------------------------------------------------------- the report


def _rel(view: LoopView, ts: float) -> float:
    return ts - view.start


def _plot_accuracy(view: LoopView, path: Path) -> None:
    import matplotlib.pyplot as plt

    versions = sorted(view.trained)
    hold = [view.trained[v][1].challenger_score for v in versions]
    live = [view.feedback_accuracy(v)[0] for v in versions]
    metric = "R²" if view.metric == "r2" else view.metric
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = range(len(versions))
    ax.bar([x - 0.2 for x in xs], hold, width=0.4, label="holdout (trainer)")
    ax.bar([x + 0.2 for x in xs], [a or 0.0 for a in live], width=0.4, label="on feedback (monitor)")
    ax.set_xticks(list(xs), [f"v{v}" for v in versions])
    ax.set_ylim(min([0.0, *hold, *(a or 0.0 for a in live)]), 1.05)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per model version")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_variants(view: LoopView, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for version, (_, c) in sorted(view.compressed.items()):
        ok = [v for v in c.variants if not v.error]
        ax.scatter(
            [v.size_bytes / 1024 for v in ok], [v.latency_p50_ms_b32 for v in ok], label=f"v{version}", alpha=0.7
        )
        for v in ok:
            if v.name == c.chosen_variant:
                ax.annotate(f"{v.name} (chosen)", (v.size_bytes / 1024, v.latency_p50_ms_b32), fontsize=7)
    ax.set_xlabel("size (KiB)")
    ax.set_ylabel("p50 latency, batch 32 (ms)")
    ax.set_title("compressed variants: size and CPU latency")
    if view.compressed:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_freshness(rows: list[Freshness], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"data v{r.dataset_version}\n→ model v{r.model_version}" for r in rows]
    ax.bar(labels, [r.train_s for r in rows], label="training")
    ax.bar(labels, [r.compress_s for r in rows], bottom=[r.train_s for r in rows], label="compression")
    ax.bar(labels, [r.other_s for r in rows], bottom=[r.compute_s for r in rows], label="everything else")
    ax.set_ylabel("seconds")
    ax.set_title("freshness: firing record → new version answering")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traffic(view: LoopView, samples: list[ClientSample], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    if samples:  # what clients were answered by, per 2 s
        buckets: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for s in samples:
            buckets[int(_rel(view, s.t) // 2)][s.version] += 1
        xs = sorted(buckets)
        versions = sorted({v for b in buckets.values() for v in b})
        shares = {v: [buckets[x][v] / max(1, sum(buckets[x].values())) for x in xs] for v in versions}
        ax.stackplot(
            [x * 2 for x in xs],
            *[shares[v] for v in versions],
            labels=[f"v{v}" if v else "failed" for v in versions],
        )
        ax.set_ylabel("share of client answers")
    else:  # the gateway's own record of candidate shares
        series: dict[int, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
        for ts, d in view.deployed:
            share = 1.0 if d.state == events_pb2.ROLLOUT_STATE_PROMOTED else d.traffic_fraction
            series[int(d.version)][0].append(_rel(view, ts))
            series[int(d.version)][1].append(share)
        for v, (xs_, ys) in sorted(series.items()):
            ax.step(xs_, ys, where="post", label=f"v{v}")
        ax.set_ylabel("traffic share (gateway)")
    ax.set_xlabel("seconds since start")
    ax.set_ylim(0, 1.05)
    ax.set_title("traffic share over time")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_drift(view: LoopView, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    by_version: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for _, h in view.health:
        if h.drift_threshold > 0:
            end = h.window_end.ToNanoseconds() / 1e9
            by_version[int(h.version)].append((_rel(view, end), h.drift_statistic, h.drift_threshold))
    for v, pts in sorted(by_version.items()):
        pts.sort()
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"v{v} MMD²")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle="--", color=line[0].get_color(), alpha=0.6)
    for _, a in view.alerts:
        ax.axvline(_rel(view, a.window_end.ToNanoseconds() / 1e9), color="red", alpha=0.6)
    if by_version:
        ax.set_yscale("log")
    ax.set_xlabel("seconds since start (dashed: threshold; red: alert)")
    ax.set_ylabel("drift statistic")
    ax.set_title("drift statistic over time")
    if by_version:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def summary(view: LoopView, samples: list[ClientSample], fresh: list[Freshness]) -> dict[str, Any]:
    """What the report says, as data (``summary.json``; tests read it)."""
    models = []
    for mv, (_, t) in sorted(view.trained.items()):
        c = view.compressed.get(mv)
        state, reason, share = view.rollout(mv)
        acc, n = view.feedback_accuracy(mv)
        p50, p99 = view.latency(mv)
        models.append(
            {
                "version": mv,
                "dataset_version": int(t.lineage.dataset_version),
                "verdict": events_pb2.Verdict.Name(t.verdict).removeprefix("VERDICT_").lower(),
                "metric": t.metric or "accuracy",
                "holdout_score": t.challenger_score,
                "train_s": round(float(t.lineage.duration_s), 2),
                "compressed": (c[1].ok if c else None),
                "chosen_variant": c[1].chosen_variant if c else "",
                "size_bytes": next((v.size_bytes for v in c[1].variants if v.name == c[1].chosen_variant), 0)
                if c
                else 0,
                "rollout": state,
                "rollout_reason": reason,
                "traffic_share": share,
                "feedback_accuracy": acc,
                "feedback": n,
                "p50_ms": p50,
                "p99_ms": p99,
            }
        )
    return {
        "dataset_versions": [int(u.version) for _, u in view.versions],
        "models": models,
        "serving_version": view.serving(),
        "drift_alerts": [
            {"version": int(a.version), "statistic": a.statistic, "threshold": a.threshold} for _, a in view.alerts
        ],
        "tunings": [
            {"dataset_version": int(t.dataset_version), "trials": t.trials, "best": t.best_value}
            for _, t in view.tunings
        ],
        "client": {
            "requests": len(samples),
            "failed": sum(not s.ok for s in samples),
            "accuracy_plain": _share([s.correct for s in samples if s.ok and not s.shifted]),
            "accuracy_shifted": _share([s.correct for s in samples if s.ok and s.shifted]),
        },
        "freshness": [
            {
                "dataset_version": r.dataset_version,
                "model_version": r.model_version,
                "total_s": round(r.total_s, 2),
                "compute_s": round(r.compute_s, 2),
                "other_s": round(r.other_s, 2),
            }
            for r in fresh
        ],
    }


def _share(xs: list[bool]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def write_report(
    view: LoopView,
    out_dir: Path,
    samples: list[ClientSample] | None = None,
    fresh: list[Freshness] | None = None,
    title: str = "cdl loop report",
    notes: list[str] | None = None,
) -> Path:
    """Write ``report.md``, ``summary.json`` and the plots into ``out_dir``; returns report.md."""
    import matplotlib

    matplotlib.use("Agg")
    samples = samples or []
    fresh = fresh if fresh is not None else freshness(view, {}, None)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, Callable[[Path], None]] = {
        "accuracy.png": lambda p: _plot_accuracy(view, p),
        "variants.png": lambda p: _plot_variants(view, p),
        "freshness.png": lambda p: _plot_freshness(fresh, p),
        "traffic.png": lambda p: _plot_traffic(view, samples, p),
        "drift.png": lambda p: _plot_drift(view, p),
    }
    for name, plot in plots.items():
        plot(out_dir / name)
    data = summary(view, samples, fresh)
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2))

    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.", ""]
    lines += [f"- {n}" for n in notes or []]
    c = data["client"]
    view_metric = "R²" if view.metric == "r2" else view.metric
    lines += [
        "",
        f"Serving now: **v{data['serving_version']}**. Client requests through the gateway: {c['requests']}, "
        f"failed: **{c['failed']}**; their accuracy on plain inputs {_fmt(c['accuracy_plain'])}, "
        f"on shifted inputs {_fmt(c['accuracy_shifted'])}.",
        "",
        "## Model versions",
        "",
        f"| version | data | verdict | holdout {view_metric} | train s | variant | bytes | rollout | share"
        f" | {view_metric} on feedback (n) | p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in data["models"]:
        lines.append(
            f"| v{m['version']} | v{m['dataset_version']} | {m['verdict']} | {_fmt(m['holdout_score'])} | "
            f"{m['train_s']} | {m['chosen_variant'] or '-'} | {m['size_bytes'] or '-'} | {m['rollout'] or '-'} | "
            f"{m['traffic_share']:.2f} | {_fmt(m['feedback_accuracy'])} ({m['feedback']}) | "
            f"{_fmt(m['p50_ms'], '.2f')} / {_fmt(m['p99_ms'], '.2f')} |"
        )
    reasons = [(m["version"], m["rollout_reason"]) for m in data["models"] if m["rollout_reason"]]
    if reasons:
        lines += ["", "Last rollout reason of each version:", ""]
        lines += [f"- v{v}: {r}" for v, r in reasons]
    lines += ["", "![accuracy](accuracy.png)", "", "## Freshness", ""]
    if fresh:
        lines += ["| data | model | total s | compute s | everything else s |", "|---|---|---|---|---|"]
        lines += [
            f"| v{r.dataset_version} | v{r.model_version} | {r.total_s:.1f} | {r.compute_s:.1f} | {r.other_s:.1f} |"
            for r in fresh
        ]
    else:
        lines.append("No version went from a firing record to answering yet.")
    lines += ["", "![freshness](freshness.png)", "", "## Compression", "", "![variants](variants.png)", ""]
    lines += ["## Traffic", "", "![traffic](traffic.png)", "", "## Drift", ""]
    if data["drift_alerts"]:
        lines += [
            f"- alert on v{a['version']}: statistic {a['statistic']:.4f} over threshold {a['threshold']:.4f}"
            for a in data["drift_alerts"]
        ]
    else:
        lines.append("No drift alert.")
    lines += ["", "![drift](drift.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
