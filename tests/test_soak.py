"""A short soak of the served tiny model: mixed valid, invalid, cancelled, deadline, burst, speech, edit and job
requests lose none."""

from __future__ import annotations

import collections
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_soak():
    """benchmarks/ is not a package: load the script by path (registered, as its dataclasses need)."""
    if "soak" not in sys.modules:
        spec = importlib.util.spec_from_file_location("soak", REPO / "benchmarks" / "soak.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["soak"] = module
        spec.loader.exec_module(module)
    return sys.modules["soak"]


def test_soak_loses_no_request(server, capsys, tmp_path):
    soak = load_soak()
    plot = tmp_path / "rss.svg"
    status = soak.main(["--url", server, "--duration-s", "20", "--concurrency", "4", "--warmup-s", "5",
                        "--burst-size", "16", "--burst-every-s", "10", "--seed", "1", "--json", "--rss-every-s", "5",
                        "--rss-svg", str(plot), "--mix", "valid=20,repeat=12,invalid=20,cancel=8,deadline=8,probe=4,"
                        "speech=5,edit=5,job=5,job_cancel=5,job_unfetched=5,idempotent=5"])
    output = capsys.readouterr().out
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["lost"] == 0, output[-6000:]
    # and no process's idle RSS nor open file descriptors grew past their bounds
    assert status == 0, (summary["rss"]["growth_by_process_pct"], summary["fds"]["growth_by_process"])
    assert summary["completed"] > 0 and summary["rejected"] > 0 and summary["cancelled"] > 0, output[-3000:]
    assert summary["final_checks_ok"]
    assert summary["repeated_seed_checks"] > 0
    assert summary["rss"] is not None and summary["rss"]["start_mib"] > 0  # the server's processes were found
    assert summary["by_kind"]["probe"]["completed"] > 0
    for kind in ("speech", "edit", "job", "job_unfetched", "idempotent", "job_cancel"):  # the warm-up sends each
        outcomes = collections.Counter(summary["warmup"]["by_kind"].get(kind))
        outcomes.update(summary["by_kind"].get(kind, {}))
        assert outcomes["cancelled" if kind == "job_cancel" else "completed"] > 0 and not outcomes["lost"], kind
    processes = summary["rss"]["samples"][0]["by_process_mib"]
    # each process's open file descriptors and threads sampled too (their bound is in the exit status above)
    assert summary["fds"]["start"].keys() == summary["threads"]["start"].keys() == processes.keys()
    assert all(count > 0 for count in [*summary["fds"]["end"].values(), *summary["threads"]["end"].values()])
    svg = plot.read_text()  # one line per server process, each named in the legend
    assert svg.count("<polyline") == len(processes) >= 3 and all(name in svg for name in processes)


def idle_samples(mib: list[dict], fds: list[dict]) -> list[dict]:
    """The samples after the warm-up and at the end, of each process's RSS and open file descriptors as given."""
    return [{"label": label, "t_s": 0.0, "rss_mib": sum(each_mib.values()), "processes": 2, "by_process_mib": each_mib,
             "by_process_fds": each_fds, "by_process_threads": {"front (1)": 8, "engine (2)": 10}, "temp_entries": 3}
            for label, each_mib, each_fds in zip(("start", "end"), mib, fds)]


def soaked_with(soak, monkeypatch, samples: list[dict]) -> None:
    async def soaked(args, process=None):
        return soak.summarize(args, soak.Stats(), soak.Stats(), soak.Stats(), 600.0, samples, [[1, 2], [1, 2]])

    monkeypatch.setattr(soak, "soak", soaked)


def test_a_process_whose_memory_grows_fails_the_soak_even_when_the_sum_hides_it(monkeypatch, capsys):
    """Idle RSS after the warm-up and at the end: the front grows 30 % (a leak), the whole tree 9 %."""
    soak = load_soak()
    fds = {"front (1)": 20, "engine (2)": 20}
    soaked_with(soak, monkeypatch, idle_samples([{"front (1)": 500.0, "engine (2)": 1500.0},
                                                 {"front (1)": 650.0, "engine (2)": 1530.0}], [fds, fds]))
    assert soak.main(["--url", "http://127.0.0.1:8091"]) == 2
    assert "front (1): idle RSS grew +30.00 %" in capsys.readouterr().out
    assert soak.main(["--url", "http://127.0.0.1:8091", "--max-rss-growth-pct", "40"]) == 0


def test_a_process_whose_file_descriptors_grow_fails_the_soak(monkeypatch, capsys):
    """The engine's idle descriptors grow by 25 (a socket or file left open per request), its RSS not at all."""
    soak = load_soak()
    mib = {"front (1)": 500.0, "engine (2)": 1500.0}
    soaked_with(soak, monkeypatch, idle_samples([mib, mib], [{"front (1)": 20, "engine (2)": 20},
                                                             {"front (1)": 22, "engine (2)": 45}]))
    assert soak.main(["--url", "http://127.0.0.1:8091", "--json"]) == 3
    output = capsys.readouterr().out
    assert "engine (2): +25 open file descriptors, above --max-fd-growth 20" in output
    assert "front (1): +" not in output  # its 2 are within the bound
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["fds"]["growth_by_process"] == {"front (1)": 2, "engine (2)": 25}
    assert summary["temp_entries"] == {"start": 3, "end": 3, "growth": 0}
    assert soak.main(["--url", "http://127.0.0.1:8091", "--max-fd-growth", "25"]) == 0


def test_soak_refuses_a_server_that_is_not_on_loopback(capsys):
    soak = load_soak()
    for url in ("http://10.0.0.1:8091", "http://example.com", "http://0.0.0.0:8091"):
        try:
            soak.parse_args(["--url", url])
        except SystemExit as exit:
            assert exit.code == 2
        else:
            raise AssertionError(f"{url} was accepted")
    assert "only a loopback server" in capsys.readouterr().err
    assert soak.parse_args(["--url", "http://[::1]:8091/"]).url == "http://[::1]:8091"


def test_the_job_ttl_is_refused_for_a_server_the_soak_did_not_start(capsys):
    soak = load_soak()
    try:
        soak.parse_args(["--url", "http://127.0.0.1:8091", "--job-ttl-s", "10"])
    except SystemExit as exit:
        assert exit.code == 2
    else:
        raise AssertionError("--job-ttl-s was accepted with --url")
    assert "--job-ttl-s sets the TTL of the server this script starts" in capsys.readouterr().err
    assert soak.parse_args(["--job-ttl-s", "10"]).job_ttl_s == 10.0
