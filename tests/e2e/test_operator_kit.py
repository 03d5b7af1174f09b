"""The operator's kit: config/prometheus-rules.yml and config/grafana-dashboard.json.

Every metric they name must be one a running gateway really exposes (with the labels they
select on), the rules must pass `promtool check rules` and their unit tests
(config/prometheus-rules.test.yml), the dashboard's queries must parse as PromQL, and both
files must select the same scrape job."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.deploys.pipelines.webhook import DELIVERY_RESULTS
from gateway.git.packcache import RESULTS as PACK_CACHE_RESULTS
from gateway.metrics import FORWARD_OUTCOMES
from gateway.models import DeployStatus
from gateway.ssh.commands import GIT_SERVICES
from tests.helpers import TIMEOUT, Client, ServerThread, http, http_base

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus-rules.yml"
RULES_TESTS = ROOT / "config" / "prometheus-rules.test.yml"
DASHBOARD = ROOT / "config" / "grafana-dashboard.json"
JOB = "git-gateway"
REQUIRED = os.environ.get("GATEWAY_REQUIRE_TOOLS") == "1"  # CI installs prometheus: never skip

# PromQL's own words: an identifier followed by "(" must be one of the functions or
# aggregations below (an unknown one is a typo, and fails); the keywords are never metrics.
PROMQL_FUNCTIONS = {
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "label_replace",
    "last_over_time",
    "max_over_time",
    "min_over_time",
    "predict_linear",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sort",
    "sort_desc",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
}
PROMQL_AGGREGATIONS = {
    "avg",
    "bottomk",
    "count",
    "count_values",
    "group",
    "max",
    "min",
    "quantile",
    "stddev",
    "stdvar",
    "sum",
    "topk",
}
PROMQL_KEYWORDS = {
    "and",
    "bool",
    "by",
    "group_left",
    "group_right",
    "ignoring",
    "inf",
    "le",
    "nan",
    "offset",
    "on",
    "or",
    "unless",
    "without",
}
# Series that Prometheus makes itself for every target, not the gateway.
SCRAPE_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
# Labels every series has once scraped: the target's.
TARGET_LABELS = {"job", "instance"}
# Families the kit deliberately leaves out (each with its reason); any other family the
# gateway exports must be charted or alerted on.
NOT_CHARTED: set[str] = set()
# Closed sets of label values, from the code that sets them: a selector on any other value
# would never match.
LABEL_VALUES = {
    ("gateway_deploys_total", "status"): {s.value for s in DeployStatus},
    ("gateway_deploy_duration_seconds_bucket", "status"): {s.value for s in DeployStatus},
    ("gateway_pack_cache_requests_total", "result"): set(PACK_CACHE_RESULTS),
    ("gateway_git_forwarded_total", "outcome"): set(FORWARD_OUTCOMES),
    ("gateway_webhook_deliveries_total", "result"): set(DELIVERY_RESULTS),
    ("gateway_git_operations_total", "verb"): {s.removeprefix("git-") for s in GIT_SERVICES},
    ("gateway_git_operation_duration_seconds_bucket", "verb"): {
        s.removeprefix("git-") for s in GIT_SERVICES
    },
}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][\w:]*)(\s*\()?")
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


# -- PromQL, read just enough -----------------------------------------------------------


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (bare, or before a {selector} or [range])."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)  # by (label, ...) and friends
    text = re.sub(r"\boffset\s+\S+", " ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana's $variables
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word, call = match.group(1), match.group(2)
        if call:
            assert word in PROMQL_FUNCTIONS | PROMQL_AGGREGATIONS, (
                f"unknown PromQL function {word!r} in {expr!r}: a typo, or add it to the lists"
            )
        elif word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def selectors(expr: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Each name{...} of an expression, with its (label, operator, value) matchers."""
    # Strings may hold braces: find the selectors with the strings blanked, read the
    # matchers from the same span of the original.
    blanked = _STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)
    found = []
    for match in _SELECTOR.finditer(blanked):
        body = expr[match.start(2) : match.end(2)]
        found.append((match.group(1), _MATCHER.findall(body)))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels an expression groups or matches on: by (...), without (...), on (...)."""
    labels: set[str] = set()
    for match in _GROUPING.finditer(_STRING.sub('""', expr)):
        labels |= {part.strip() for part in match.group(2).split(",") if part.strip()}
    return labels


# -- the two files ------------------------------------------------------------------------


def rules() -> list[dict[str, str]]:
    """Each alerting rule of config/prometheus-rules.yml as {key: value}, its nested keys
    (severity, summary...) flattened. Reads this file's plain block layout (PyYAML is not a
    dependency); promtool reads it for real, and the rule count is checked against it."""
    found: list[dict[str, str]] = []
    lines = RULES.read_text().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        match = re.match(r"(\s*)(?:- )?(\w+):\s*(.*?)\s*$", line)
        if line.lstrip().startswith("#") or not match:
            continue
        indent, key, value = len(match.group(1)), match.group(2), match.group(3)
        if value in (">-", ">", "|", "|-"):
            block = []
            while index < len(lines) and (
                not lines[index].strip() or len(lines[index]) - len(lines[index].lstrip()) > indent
            ):
                block.append(lines[index].strip())
                index += 1
            value = " ".join(part for part in block if part)
        elif len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key == "alert":
            found.append({})
        if found and key != "alert" and key in found[-1]:
            raise AssertionError(f"{key} twice in rule {found[-1].get('alert')}")
        if found:
            found[-1][key] = value
    return found


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in all_panels(board)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def every_expr() -> list[tuple[str, str]]:
    """(where, expression) for each rule and each dashboard query."""
    return [(f"rule {r['alert']}", r["expr"]) for r in rules()] + [
        (f"panel {title!r}", expr) for title, expr in dashboard_exprs(dashboard())
    ]


# -- what a gateway exposes -----------------------------------------------------------------

SUFFIXES = {
    "counter": ("",),  # the family is named with its _total already in the text format
    "gauge": ("",),
    "untyped": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def families(text: str) -> dict[str, str]:
    """Family -> type, from the # TYPE lines of a /metrics page (a labelled metric without
    samples yet is declared too). prometheus_client's *_created gauges are left out:
    `serve --workers` (multiprocess mode) does not export them, so nothing may rely on them."""
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"# TYPE (\S+) (\S+)", line)
        if match and not match.group(1).endswith("_created"):
            found[match.group(1)] = match.group(2)
    return found


def exposed(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, for every family the page declares (by its type: a
    histogram's _bucket, _sum and _count) and the labels of its samples."""
    names: dict[str, set[str]] = {
        family + suffix: set()
        for family, kind in families(text).items()
        for suffix in SUFFIXES[kind]
    }
    for line in text.splitlines():
        match = re.match(r"([A-Za-z_:][\w:]*)(?:\{(.*)\})? ", line)
        if match and match.group(1) in names:
            names[match.group(1)] |= set(re.findall(r'(\w+)="', match.group(2) or ""))
    return names


def declared_labels(server: ServerThread) -> dict[str, set[str]]:
    """Sample name -> label names from the gateway's metric objects themselves, so that a
    labelled family without samples yet still has its labels known."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, set[str]] = {}
    for metric in vars(server.gateway.metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        name, labels = metric._name, set(metric._labelnames)
        if metric._type == "counter":
            out[name + "_total"] = labels
        elif metric._type == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


def scrape(server: ServerThread) -> str:
    reply = http("GET", http_base(server) + "/metrics")
    assert reply.status == 200
    return reply.body.decode()


# -- tests ----------------------------------------------------------------------------------


def test_the_parser_reads_promql_as_intended() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job="x", s=~"b|c"}[5m])))'
        ' / ignoring(q) group_left b_total offset 1h > 1/60 and on (i) absent(up{j="}"})'
        " unless c[$__rate_interval] * 1e3"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "c"}
    assert selectors(expr) == [
        ("a_bucket", [("job", "=", "x"), ("s", "=~", "b|c")]),
        ("up", [("j", "=", "}")]),
    ]
    assert grouping_labels(expr) == {"job", "le", "q", "i"}
    with pytest.raises(AssertionError, match="unknown PromQL function 'rated'"):
        metric_names("rated(x[5m])")


def test_every_metric_named_is_exposed_by_a_running_gateway(
    server: ServerThread, owner: Client, app: str, tmp_path: Path
) -> None:
    # A push, a clone (through the pack cache), a probe: labelled series get samples.
    repo = owner.new_repo(tmp_path / "work")
    owner.git("push", "-q", owner.url(app), "main", cwd=repo, check=True)
    owner.git("clone", "-q", owner.url(app), str(tmp_path / "clone"), check=True)
    assert http("GET", http_base(server) + "/readyz").status == 200
    text = scrape(server)
    # GitGatewayNotReady selects the probe by its route label, as the gateway writes it.
    assert re.search(r'^gateway_http_requests_total\{code="200",route="/readyz"\} ', text, re.M)
    names = exposed(text)
    for name, labels in declared_labels(server).items():
        assert name in names, f"{name} is defined but not on /metrics"
        names[name] |= labels
    # The kit is not vacuous: it reads the families an operator needs most.
    assert "gateway_git_operations_total" in names and "process_cpu_seconds_total" in names

    used: dict[str, set[str]] = {}
    problems = []
    for where, expr in every_expr():
        found = metric_names(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for name in found:
            used.setdefault(name, set()).add(where)
            if name not in names and name not in SCRAPE_SERIES:
                problems.append(f"{where}: {name} is not exposed by the gateway")
        # Label matchers name labels the series has, and values that can occur.
        for name, matchers in selectors(expr):
            known = names.get(name, set()) | TARGET_LABELS
            for label, operator, value in matchers:
                if label not in known:
                    problems.append(f"{where}: {name} has no label {label!r}")
                values = LABEL_VALUES.get((name, label))
                if values is None or operator not in ("=", "=~"):
                    continue
                wanted = value.split("|") if operator == "=~" else [value]
                problems += [
                    f"{where}: {name}{{{label}={v!r}}} never occurs (one of {sorted(values)})"
                    for v in wanted
                    if v not in values
                ]
        # by (...) / on (...) name labels of the series the expression reads.
        available = TARGET_LABELS.union(*(names.get(n, set()) for n in found))
        problems += [
            f"{where}: groups by {label!r}, a label none of {sorted(found)} has"
            for label in grouping_labels(expr) - available
        ]
    assert not problems, "\n".join(problems)
    # The kit covers every family the gateway defines, but for these few.
    unused = {
        family
        for family, kind in families(text).items()
        if not any(family + suffix in used for suffix in SUFFIXES[kind])
    }
    assert unused <= NOT_CHARTED, f"not in the dashboard nor the rules: {sorted(unused)}"


def test_rules_are_complete_and_select_the_job() -> None:
    found = rules()
    assert len(found) >= 10
    names = [r["alert"] for r in found]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in found:
        where = rule["alert"]
        assert re.fullmatch(r"GitGateway[A-Z]\w+", where), where
        assert {"expr", "for", "severity", "summary", "description"} <= rule.keys(), where
        assert rule["severity"] in ("warning", "critical"), where
        assert re.fullmatch(r"\d+[smh]", rule["for"]), where
        # Each series the rule reads is the gateway job's (never every job's `up`).
        for name, matchers in selectors(rule["expr"]):
            assert ("job", "=", JOB) in matchers, f"{where}: {name} without job={JOB!r}"
        for name in metric_names(rule["expr"]):
            assert re.search(rf"\b{name}\{{", rule["expr"]), f"{where}: bare {name}"
    assert {"GitGatewayDown", "GitGatewayRegistryUnavailable", "GitGatewayInternalErrors"} <= set(
        names
    )
    assert f'job="{JOB}"' in RULES.read_text().split("groups:")[0], "the header names the job"


def test_dashboard_is_importable_and_consistent_with_the_rules() -> None:
    board = dashboard()
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    assert f'job="{JOB}"' in variables["instance"]["definition"]
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels:
        for key in ("x", "y", "w", "h"):
            assert isinstance(panel["gridPos"][key], int), panel["title"]
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel.get("datasource") == ds, f"{panel['title']}: no datasource reference"
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource") == ds, panel["title"]
    exprs = dashboard_exprs(board)
    assert len(exprs) >= 20
    # The same job as the rules, on every series, and the node picker on every series.
    rule_jobs = {
        value
        for r in rules()
        for _, matchers in selectors(r["expr"])
        for label, _, value in matchers
        if label == "job"
    }
    assert rule_jobs == {JOB}
    for title, expr in exprs:
        for name, matchers in selectors(expr):
            labels = {(label, op, value) for label, op, value in matchers}
            assert ("job", "=", JOB) in labels, f"{title}: {name} without job={JOB!r}"
            assert ("instance", "=~", "$instance") in labels, f"{title}: {name} without $instance"
        for name in metric_names(expr):
            assert re.search(rf"\b{name}\{{", expr), f"{title}: bare {name}"


# -- promtool ---------------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if REQUIRED:
            pytest.fail("promtool is not installed (CI installs Debian's prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def test_promtool_checks_the_rules() -> None:
    done = run_promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    # promtool counts what the test's own reader of the file found.
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


def test_promtool_unit_tests_of_the_rules() -> None:
    done = run_promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_parses_the_dashboard_queries(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: promtool parses
    them as Prometheus would."""
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$instance": ".*"}
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for number, (_, expr) in enumerate(dashboard_exprs(dashboard())):
        for variable, value in fill.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        lines += [f"      - record: dashboard:query_{number}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(lines) + "\n")
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
