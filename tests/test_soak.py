"""A short soak of the served tiny model: mixed valid, invalid, cancelled, deadline and burst requests lose none."""

from __future__ import annotations

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
                        "--rss-svg", str(plot), "--mix", "valid=35,repeat=15,invalid=25,cancel=12,deadline=13,probe=5"])
    output = capsys.readouterr().out
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["lost"] == 0, output[-6000:]
    assert status == 0, summary["rss"]["growth_by_process_pct"]  # and no process's idle RSS grew past the bound
    assert summary["completed"] > 0 and summary["rejected"] > 0 and summary["cancelled"] > 0, output[-3000:]
    assert summary["final_checks_ok"]
    assert summary["repeated_seed_checks"] > 0
    assert summary["rss"] is not None and summary["rss"]["start_mib"] > 0  # the server's processes were found
    assert summary["by_kind"]["probe"]["completed"] > 0
    processes = summary["rss"]["samples"][0]["by_process_mib"]
    svg = plot.read_text()  # one line per server process, each named in the legend
    assert svg.count("<polyline") == len(processes) >= 3 and all(name in svg for name in processes)


def test_a_process_whose_memory_grows_fails_the_soak_even_when_the_sum_hides_it(monkeypatch, capsys):
    """Idle RSS after the warm-up and at the end: the front grows 30 % (a leak), the whole tree 9 %."""
    soak = load_soak()
    idle = [{"label": label, "t_s": 0.0, "rss_mib": sum(each.values()), "processes": 2, "by_process_mib": each}
            for label, each in (("start", {"front (1)": 500.0, "engine (2)": 1500.0}),
                                ("end", {"front (1)": 650.0, "engine (2)": 1530.0}))]

    async def soaked(args, process=None):
        return soak.summarize(args, soak.Stats(), soak.Stats(), soak.Stats(), 600.0, idle, [[1, 2], [1, 2]])

    monkeypatch.setattr(soak, "soak", soaked)
    assert soak.main(["--url", "http://127.0.0.1:8091"]) == 2
    assert "front (1): idle RSS grew +30.00 %" in capsys.readouterr().out
    assert soak.main(["--url", "http://127.0.0.1:8091", "--max-rss-growth-pct", "40"]) == 0


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
