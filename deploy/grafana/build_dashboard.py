"""Writes deploy/grafana/dashboards/softvq.json, the Grafana dashboard of softvq-serve.

The JSON is generated so that every panel follows the same layout rules and every query is
written once, here, in plain PromQL. Run it after editing and commit both files:

    python3 deploy/grafana/build_dashboard.py

tests/test_deploy.py checks that the committed JSON is what this script writes and that every
metric queried is exported by the service (service/metrics.py).

Conventions of the queries: rates use Grafana's ``$__rate_interval``; ``$model`` is the
dashboard's model filter (a regex, ``.*`` for all); gauges that the API and every worker
report about the same shared queue are combined with ``max``, counters with ``sum``.
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "softvq-prometheus"}  # see provisioning/datasources
OUT = Path(__file__).parent / "dashboards" / "softvq.json"
RATE = "$__rate_interval"
M = 'model=~"$model"'  # the model filter every per-model query carries


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping into new rows."""

    def __init__(self):
        self.panels: list[dict] = []
        self.x = self.y = self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
            }
        )
        self.y += 1

    def add(self, panel: dict, w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = self.row_h = 0

    def numbered(self) -> list[dict]:
        for i, p in enumerate(self.panels, start=1):
            p["id"] = i
        return self.panels


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    return {"refId": ref, "datasource": DATASOURCE, "expr": expr, "legendFormat": legend, **extra}


def panel(
    kind: str, title: str, description: str, targets: list[dict], unit: str = "short", **options
) -> dict:
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }
    if options:
        p["options"] = options
    return p


def timeseries(
    title: str, description: str, targets: list[dict], unit: str = "short", stack: bool = False
) -> dict:
    p = panel(
        "timeseries",
        title,
        description,
        targets,
        unit,
        legend={
            "displayMode": "table",
            "placement": "bottom",
            "calcs": ["mean", "max", "lastNotNull"],
        },
        tooltip={"mode": "multi", "sort": "desc"},
    )
    p["fieldConfig"]["defaults"]["custom"] = {
        "drawStyle": "line",
        "lineWidth": 1,
        "fillOpacity": 10,
        "showPoints": "never",
        "stacking": {"mode": "normal" if stack else "none"},
    }
    return p


def stat(
    title: str,
    description: str,
    expr: str,
    unit: str = "short",
    thresholds: list[tuple[float | None, str]] | None = None,
) -> dict:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    p = panel(
        "stat",
        title,
        description,
        [target(expr, instant=True)],
        unit,
        reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False},
        colorMode="background",
        graphMode="none",
        textMode="value",
    )
    p["fieldConfig"]["defaults"]["thresholds"] = {"mode": "absolute", "steps": steps}
    return p


def bars(title: str, description: str, targets: list[dict], unit: str) -> dict:
    """Horizontal bars, one per series: models side by side at a glance."""
    return panel(
        "bargauge",
        title,
        description,
        targets,
        unit,
        orientation="horizontal",
        displayMode="gradient",
        showUnfilled=True,
        reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False},
    )


def quantiles(metric: str, by: str, selector: str = M) -> list[dict]:
    """p50 / p95 / p99 of a histogram, one series per ``by`` label set."""
    return [
        target(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by.replace(', ', '}} {{')}}}}}",
            ref,
        )
        for q, ref in ((0.5, "A"), (0.95, "B"), (0.99, "C"))
    ]


def build() -> dict:
    L = Layout()

    # --- at a glance ----------------------------------------------------------------------
    L.row("Overview")
    L.add(
        stat(
            "Requests/s",
            "All HTTP requests, every endpoint and status.",
            f"sum(rate(softvq_requests_total[{RATE}]))",
            "reqps",
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Error ratio",
            "Share of requests answered 5xx or 429 (turned away).",
            f'sum(rate(softvq_requests_total{{status=~"5..|429"}}[{RATE}])) / '
            f"sum(rate(softvq_requests_total[{RATE}]))",
            "percentunit",
            [(None, "green"), (0.01, "orange"), (0.05, "red")],
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Images/s",
            "Images encoded, decoded or generated, all models.",
            f"sum(rate(softvq_images_processed_total[{RATE}]))",
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Tokens/s",
            "Latent tokens produced or consumed, all models.",
            f"sum(rate(softvq_tokens_processed_total[{RATE}]))",
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Queued jobs",
            "Jobs waiting in every queue.",
            "sum(max by (model, task) (softvq_queue_depth))",
            "short",
            [(None, "green"), (32, "orange"), (128, "red")],
        ),
        4,
        4,
    )
    L.add(
        stat(
            "Live workers",
            "Workers with a fresh heartbeat, as the API sees them.",
            "max(softvq_workers_alive)",
            "short",
            [(None, "red"), (1, "green")],
        ),
        4,
        4,
    )

    # --- model comparison -----------------------------------------------------------------
    L.row("Throughput per model and task (32-token vs 64-token vs 2-D baseline)")
    L.add(
        timeseries(
            "Images/s by model and task",
            "Images encoded (tokenize), decoded, reconstructed or generated per second.",
            [
                target(
                    f"sum by (model, task) (rate(softvq_images_processed_total{{{M}}}[{RATE}]))",
                    "{{model}} {{task}}",
                )
            ],
            "short",
        ),
        12,
    )
    L.add(
        timeseries(
            "Tokens/s by model and task",
            "Latent tokens produced or consumed per second: a 32-token model moves half the tokens "
            "of a 64-token one per image.",
            [
                target(
                    f"sum by (model, task) (rate(softvq_tokens_processed_total{{{M}}}[{RATE}]))",
                    "{{model}} {{task}}",
                )
            ],
            "short",
        ),
        12,
    )
    L.add(
        bars(
            "Images/s per model and task, side by side (last 5 min)",
            "The same task on different models compares directly: generation on 32-token, "
            "64-token and baseline models in adjacent bars.",
            [
                target(
                    f"sum by (task, model) (rate(softvq_images_processed_total{{{M}}}[5m]))",
                    "{{task}} · {{model}}",
                    instant=True,
                )
            ],
            "short",
        ),
        12,
        9,
    )
    L.add(
        bars(
            "Batch compute p95 per model and task",
            "Model time of one batch (95th percentile over 5 min).",
            [
                target(
                    "histogram_quantile(0.95, sum by (le, task, model) "
                    f"(rate(softvq_compute_seconds_bucket{{{M}}}[5m])))",
                    "{{task}} · {{model}}",
                    instant=True,
                )
            ],
            "s",
        ),
        6,
        9,
    )
    models = panel(
        "table",
        "Models served",
        "One row per model: kind, tokens per image, token width, backend, device, dtype.",
        [
            target(
                "max by (model, kind, tokens, dim, backend, device, dtype) "
                f"(softvq_model_info{{{M}}})",
                format="table",
                instant=True,
            )
        ],
        showHeader=True,
    )
    models["transformations"] = [
        {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}
    ]
    L.add(models, 6, 9)

    # --- the speedup, live ------------------------------------------------------------------
    # The same arithmetic as deploy/prometheus/recording.yml (model:softvq_generate_speedup_vs_2d
    # :rate5m), written out so the dashboard works on a Prometheus without those rules.
    L.row("Speedup vs 2-D baseline")
    gen = f'task="generate", {M}'
    per_image = (
        f"sum by (model) (rate(softvq_compute_seconds_sum{{{gen}}}[5m])) / "
        f"sum by (model) (rate(softvq_images_processed_total{{{gen}}}[5m]))"
    )
    baseline = (
        f"avg(({per_image}) * on (model) group_left () max by (model) "
        f'(softvq_generator_family{{family="latent-2d"}}))'
    )
    L.add(
        timeseries(
            "Generated images/s: SoftVQ generators beside the 2-D baseline",
            "Images generated per second by each generator (SiT on 32 / 64 SoftVQ tokens, and "
            "SiT/2 on SD-VAE latents decoded by the SD-VAE), side by side under the same traffic.",
            [
                target(
                    f"sum by (model) (rate(softvq_images_processed_total{{{gen}}}[{RATE}]))",
                    "{{model}}",
                )
            ],
            "short",
        ),
        10,
    )
    speedup = panel(
        "stat",
        "Speedup vs 2-D baseline (model time per image, 5 min)",
        "Seconds of model time per image of the 2-D baseline (family latent-2d) divided by "
        "each generator's own: how many times cheaper its images are on this hardware. The "
        "baseline reads 1; nothing shows while no baseline has generated in the last 5 min.",
        [target(f"{baseline} / on () group_right () ({per_image})", "{{model}}", instant=True)],
        "x",
        reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False},
        colorMode="background",
        graphMode="none",
        textMode="value_and_name",
    )
    speedup["fieldConfig"]["defaults"]["decimals"] = 1
    speedup["fieldConfig"]["defaults"]["thresholds"] = {
        "mode": "absolute",
        "steps": [{"value": None, "color": "blue"}, {"value": 1.5, "color": "green"}],
    }
    L.add(speedup, 6)
    L.add(
        timeseries(
            "Model seconds per generated image",
            "Model (compute) time of generate batches divided by the images they made, per "
            "generator, over 5 min: the cost of one image, independent of the traffic mix.",
            [target(per_image, "{{model}}")],
            "s",
        ),
        8,
    )

    # --- latency --------------------------------------------------------------------------
    L.row("Latency")
    L.add(
        timeseries(
            "Request latency p50 / p95 / p99 by endpoint",
            "End-to-end, from request received to response sent.",
            quantiles("softvq_request_duration_seconds", "endpoint"),
            "s",
        ),
        12,
    )
    L.add(
        timeseries(
            "Queue wait p50 / p95 / p99 by model and task",
            "Time a job waited before its batch started.",
            quantiles("softvq_queue_wait_seconds", "model, task"),
            "s",
        ),
        12,
    )
    L.add(
        timeseries(
            "Batch compute p50 / p95 / p99 by model and task",
            "Model time of one batch (grows with batch size).",
            quantiles("softvq_compute_seconds", "model, task"),
            "s",
        ),
        12,
    )
    L.add(
        timeseries(
            "Mean request latency by endpoint and model",
            "Average end-to-end latency; compare models on the same endpoint.",
            [
                target(
                    f"sum by (endpoint, model) (rate(softvq_request_duration_seconds_sum{{{M}}}[{RATE}]))"
                    f" / sum by (endpoint, model) (rate(softvq_request_duration_seconds_count{{{M}}}[{RATE}]))",
                    "{{endpoint}} {{model}}",
                )
            ],
            "s",
        ),
        12,
    )

    # --- queues and batching --------------------------------------------------------------
    L.row("Queues and batching")
    L.add(
        timeseries(
            "Queue depth by model and task",
            "Jobs waiting (max over the processes that report it).",
            [target(f"max by (model, task) (softvq_queue_depth{{{M}}})", "{{model}} {{task}}")],
        ),
        8,
    )
    heat = panel(
        "heatmap",
        "Batch size distribution",
        "How many items each model call carried (all models in the filter).",
        [
            target(
                f"sum by (le) (increase(softvq_batch_size_bucket{{{M}}}[{RATE}]))",
                "{{le}}",
                format="heatmap",
            )
        ],
        calculate=False,
        cellGap=1,
        yAxis={"unit": "short"},
        color={"mode": "scheme", "scheme": "Oranges", "steps": 64},
        tooltip={"mode": "single", "yHistogram": True},
    )
    L.add(heat, 8)
    L.add(
        timeseries(
            "Mean batch size by model and task",
            "Items per model call; low values under load mean max_wait_ms is too short.",
            [
                target(
                    f"sum by (model, task) (rate(softvq_batch_size_sum{{{M}}}[{RATE}]))"
                    f" / sum by (model, task) (rate(softvq_batch_size_count{{{M}}}[{RATE}]))",
                    "{{model}} {{task}}",
                )
            ],
        ),
        8,
    )

    # --- lanes and the result cache (service/lanes.py, service/result_cache.py) -----------
    L.row("Lanes and result cache")
    L.add(
        timeseries(
            "Queue depth by lane",
            "Jobs waiting per lane: interactive (sync requests) is served first; batch (async"
            " jobs) gets at least one batch in SOFTVQ_INTERACTIVE_BURST + 1.",
            [
                target(
                    f"sum by (lane) (max by (model, task, lane) (softvq_lane_queue_depth{{{M}}}))",
                    "{{lane}}",
                )
            ],
        ),
        8,
    )
    L.add(
        timeseries(
            "Queue wait by lane",
            "Time from submission to the start of the job's batch. Interactive p95 rising with"
            " the batch lane's depth would mean priority inversion.",
            quantiles("softvq_lane_queue_wait_seconds", "lane", selector=""),
            "s",
        ),
        8,
    )
    L.add(
        timeseries(
            "Result cache hit ratio",
            "Share of cacheable requests answered from the cache (they never reach a worker).",
            [
                target(
                    f"sum by (task) (rate(softvq_cache_hits_total{{{M}}}[{RATE}]))"
                    f" / (sum by (task) (rate(softvq_cache_hits_total{{{M}}}[{RATE}]))"
                    f" + sum by (task) (rate(softvq_cache_misses_total{{{M}}}[{RATE}])))",
                    "{{task}}",
                )
            ],
            "percentunit",
        ),
        8,
    )

    # --- errors ---------------------------------------------------------------------------
    L.row("Errors")
    L.add(
        timeseries(
            "Responses by status (non-2xx)",
            "4xx: bad input; 429: queue full; 503: broker down; 504: deadline missed.",
            [
                target(
                    f'sum by (status) (rate(softvq_requests_total{{status!~"2.."}}[{RATE}]))',
                    "{{status}}",
                )
            ],
            "reqps",
            stack=True,
        ),
        8,
    )
    L.add(
        timeseries(
            "Errors by endpoint and status",
            "Non-2xx responses per endpoint.",
            [
                target(
                    f'sum by (endpoint, status) (rate(softvq_requests_total{{status!~"2..", {M}}}[{RATE}]))',
                    "{{endpoint}} {{status}}",
                )
            ],
            "reqps",
        ),
        8,
    )
    L.add(
        timeseries(
            "Failed and retried jobs",
            "Jobs that ended in an error for their caller, and jobs delivered again "
            "after a worker died or failed.",
            [
                target(
                    f"sum by (model, task, reason) (rate(softvq_jobs_failed_total{{{M}}}[{RATE}]))",
                    "failed {{model}} {{task}} {{reason}}",
                ),
                target(
                    f"sum by (model, task) (rate(softvq_job_retries_total{{{M}}}[{RATE}]))",
                    "retried {{model}} {{task}}",
                    "B",
                ),
            ],
            "ops",
        ),
        8,
    )

    # --- workers and GPU ------------------------------------------------------------------
    L.row("Workers and GPU")
    L.add(
        timeseries(
            "Worker utilisation",
            "Share of wall time each worker spends running batches (1 = always busy).",
            [
                target(
                    f"sum by (worker) (rate(softvq_worker_busy_seconds_total[{RATE}]))",
                    "{{worker}}",
                )
            ],
            "percentunit",
        ),
        8,
    )
    L.add(
        timeseries(
            "Workers busy now and alive",
            "Workers running a batch at this moment, and workers with a fresh heartbeat.",
            [
                target("sum(softvq_worker_busy)", "busy"),
                target("max(softvq_workers_alive)", "alive", "B"),
            ],
        ),
        8,
    )
    L.add(
        timeseries(
            "Restarts and hung model calls (last hour)",
            "Process restarts per API / worker (crash, OOM kill, or exit 70 after a hung "
            "model call), and hangs counted by processes that stay up "
            "(SOFTVQ_EXIT_ON_HANG=false).",
            [
                target(
                    'sum by (job, instance) (changes(process_start_time_seconds{job=~"softvq.*"}[1h]))',
                    "restarts {{job}} {{instance}}",
                ),
                target(
                    "sum by (instance) (increase(softvq_model_hangs_total[1h]))",
                    "hangs {{instance}}",
                    "B",
                ),
            ],
        ),
        8,
    )
    L.add(
        timeseries(
            "GPU memory",
            "Memory held by torch on each GPU (allocated, reserved, ...), per process.",
            [
                target(
                    "max by (instance, device, kind) (softvq_gpu_memory_bytes)",
                    "{{instance}} {{device}} {{kind}}",
                )
            ],
            "bytes",
        ),
        8,
    )

    return {
        "uid": "softvq-serve",
        "title": "softvq-serve",
        "description": "Throughput, latency, queues, errors and workers of softvq-serve.",
        "tags": ["softvq"],
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                {
                    "type": "query",
                    "name": "model",
                    "label": "Model",
                    "datasource": DATASOURCE,
                    "definition": "label_values(softvq_model_info, model)",
                    "query": {"query": "label_values(softvq_model_info, model)", "refId": "models"},
                    "multi": True,
                    "includeAll": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                    "sort": 1,
                }
            ]
        },
        "annotations": {"list": []},
        "panels": L.numbered(),
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
