"""Turning a results JSON into targets, a readable table, a Markdown section and a plot.

``python -m benchmarks.report [results.json]`` prints the tables again;
``--readme`` rewrites README.md's section between the benchmark markers with them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "latest.json")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN = "<!-- benchmarks:begin (written by python -m benchmarks.report --readme) -->"
END = "<!-- benchmarks:end -->"

# Measured elsewhere and quoted by issues 4 and 11: a reference column, not our
# measurement. (A released build, PyPI's sqlite-graft 0.2.1, installs here but its
# extension needs glibc 2.39 and this machine has 2.36: README, "Benchmarks".)
REFERENCE = {
    "name": "Graft 0.2.1 (Rust, 64-page frames)",
    "lookups": {
        "requests": 64,
        "bytes_down": 5.47e6,
        "seconds": {"loopback": 0.13, "edge": 1.55, "slow": 5.98},
        "seconds_text": {"loopback": "0.13", "edge": "1.48-1.55", "slow": "5.98"},
    },
    # issue 11: lookups by an indexed non-rowid key (Graft reads S3 directly, so its
    # server is never cold)
    "keylookups": {
        "requests": 64,
        "bytes_down": 5.47e6,
        "seconds": {"loopback": 0.24, "edge": 1.55, "slow": 6.03},
        "seconds_text": {"loopback": "0.24", "edge": "1.55", "slow": "6.03"},
    },
    "warm_ratio": 0.46,
}

SYSTEMS = {
    "graft": "graft (this project)",
    "s3vfs": "sqlite-s3vfs",
    "download": "full download + native",
    "native": "native SQLite, local file",
}
WORKLOADS = {
    "lookups": "100 random lookups",
    "keylookups": "100 lookups by key",
    "index20": "20-row index query",
    "scan": "range scan",
    "aggregate": "full-table aggregate",
}
SERVER_COLD = "graft, server cold on S3"


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def targets(r: dict) -> list[dict]:
    """Issue 4's targets, each with the value measured in this run and whether it is met."""
    out: list[dict] = []

    def add(name: str, value, text: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "measured": text, "met": met})

    cold = r.get("cold", {})
    limits = {"loopback": 0.2, "edge": 1.5, "slow": 5.4}
    for link, limit in limits.items():
        s = _get(cold, link, "lookups", "graft", "seconds")
        if s is not None:
            add(f"100 random cold lookups, {link}: <= {limit} s", s, f"{s:.3f} s", s <= limit)
    b = _get(cold, "slow", "lookups", "graft", "bytes_down")
    if b is not None:
        half = REFERENCE["lookups"]["bytes_down"] / 2
        add(
            f"100 random cold lookups, slow: <= half of Graft 0.2.1's bytes ({half / 1e6:.3f} MB)",
            b,
            f"{b / 1e6:.3f} MB",
            b <= half,
        )
    one = _get(cold, "loopback", "single", "graft", "bytes_down")
    vol = _get(r, "data", "bytes")
    if one is not None and vol:
        add(
            "one cold lookup: < 0.1% of the volume's bytes",
            one / vol,
            f"{one / 1e3:.1f} kB = {100 * one / vol:.4f}%",
            one / vol < 0.001,
        )
    for key, label in (("fresh", "fresh volume"), ("after_history", "after 200 commits")):
        ratio = _get(r, "warm", key, "ratio")
        if ratio is not None:
            add(f"warm lookups, {label}: >= 1.0x native", ratio, f"{ratio:.2f}x", ratio >= 1.0)
    for link in limits:
        g = _get(cold, link, "lookups", "graft", "seconds")
        s = _get(cold, link, "lookups", "s3vfs", "seconds")
        if g and s:
            add(
                f"100 random lookups, {link}: >= 50x faster than sqlite-s3vfs",
                s / g,
                f"{s / g:.0f}x",
                s / g >= 50,
            )
    for link, c in r.get("catchup", {}).items():
        f = c["bytes_vs_full_download"]
        add(
            f"catch-up after 1% changed, {link}: < 3% of a full download's bytes",
            f,
            f"{100 * f:.2f}%",
            f < 0.03,
        )
    out.extend(issue11_targets(r))
    w = r.get("warm", {}).get("history_pushes")
    if w:
        writes, ratio = w["max"]["object_writes"], w["max"]["bytes_ratio"]
        add(
            "single-row commit push: <= 2 object writes (worst of all pushes)",
            writes,
            f"median {w['median']['object_writes']:g}, max {writes} "
            f"({w['pushes_within_2_writes']} of {w['commits']} pushes within 2)",
            writes <= 2,
        )
        add(
            "single-row commit push: <= 1.5x compressed changed pages (worst)",
            ratio,
            f"median {w['median']['bytes_ratio']:.2f}x, max {ratio:.2f}x",
            ratio <= 1.5,
        )
    for key, label in (("rollup_push", "roll-up push"), ("bulk_push", "bulk insert push")):
        p = _get(r, "writes", key)
        if p:
            add(
                f"{label} ({p['pages']} pages): <= 2 object writes",
                p["object_writes"],
                str(p["object_writes"]),
                p["object_writes"] <= 2,
            )
            add(
                f"{label}: <= 1.5x compressed changed pages",
                p["bytes_ratio"],
                f"{p['bytes_ratio']:.2f}x",
                p["bytes_ratio"] <= 1.5,
            )
    return out


def issue11_targets(r: dict) -> list[dict]:
    """Issue 11's targets (ratios within this run, or against the quoted Graft figures)."""
    out: list[dict] = []

    def add(name: str, value, text: str, met: bool | None) -> None:
        out.append({"target": name, "value": value, "measured": text, "met": met})

    cold = r.get("cold", {})
    for kind, what in (("lookups", "by rowid"), ("keylookups", "by an indexed key")):
        ref = REFERENCE[kind]
        for link, per in cold.items():
            res = per.get(kind, {})
            dl = _get(res, "download", "seconds")
            for row, server in (("graft", "server warm"), ("graft_server_cold", "server cold")):
                g = res.get(row)
                if not g or link not in ref["seconds"]:
                    continue
                graft = ref["seconds"][link]
                label = f"100 cold lookups {what}, {server}, {link}"
                if link == "edge":
                    best = min(graft, dl) if dl else graft
                    x = g["seconds"] / best
                    add(
                        f"{label}: <= 0.4x the better of Graft and a full download",
                        x,
                        f"{g['seconds']:.3f} s = {x:.2f}x {best:.3f} s",
                        x <= 0.4,
                    )
                else:
                    limit = 1.0 if link == "loopback" else 0.8
                    x = g["seconds"] / graft
                    met = x <= limit
                    text = f"{g['seconds']:.3f} s = {x:.2f}x {graft} s"
                    name = f"{label}: <= {limit}x Graft's time"
                    if link != "loopback":
                        name += " and bytes <= Graft's"
                        met = met and g["bytes_down"] <= ref["bytes_down"]
                        text += f", {g['bytes_down'] / 1e6:.2f} MB"
                    add(name, x, text, met)
    for link, per in cold.items():
        g = _get(per, "index20", "graft")
        if g and "round_trips" in g:
            add(
                f"20-row index query, cold client, {link}: <= 3 round trips",
                g["round_trips"],
                f"{g['round_trips']} round trips ({g['requests']} requests, "
                f"{g['bytes_down'] / 1e3:.0f} kB, {_secs(g['seconds'])} s)",
                g["round_trips"] <= 3,
            )
    tables = _get(r, "data", "tables") or {}
    fraction = tables.get("orders", 0) / r["data"]["pages"] if tables else None
    for link, per in cold.items():
        g, d = _get(per, "aggregate", "graft"), _get(per, "aggregate", "download")
        if g and d:
            limit = 0.6 if fraction is not None and fraction <= 1 / 3 else 1.0
            x = g["seconds"] / d["seconds"]
            share = f" (orders is {100 * fraction:.0f}% of the file)" if fraction else ""
            add(
                f"cold full scan of orders, {link}: <= {limit}x full download + native{share}",
                x,
                f"{_secs(g['seconds'])} s = {x:.2f}x {_secs(d['seconds'])} s{_mark(d)}",
                x <= limit,
            )
    return out


def prefetch_lines(r: dict) -> list[str]:
    """Per link: PRAGMA graft_prefetch of one table next to PRAGMA graft_hydrate."""
    lines = []
    for link, x in r.get("prefetch", {}).items():
        p, h = x["prefetch"], x["hydrate"]
        how = "" if h["how"] == "measured" else "**"
        lines.append(
            f"{link:9} graft_prefetch('orders') {_secs(p['seconds'])} s"
            f"{'' if p['how'] == 'measured' else '**'}, {p['pages_fetched']} pages, "
            f"{_mb(p['bytes_down'])} MB, {p['requests']} requests in {p['round_trips']} "
            f"round trips (a scan after it moved {p['check_requests']} requests, rows "
            f"{'agree' if p.get('rows_agree') else 'DIFFER'}); graft_hydrate "
            f"{_secs(h['seconds'])} s{how}, {h['pages_fetched']} pages, "
            f"{_mb(h['bytes_down'])} MB ({h['seconds'] / p['seconds']:.1f}x the time)"
        )
    return lines


def breakdown_lines(r: dict) -> list[str]:
    """One cold lookup, where its time went, per link, server warm and cold."""
    lines = []
    for link, per in r.get("cold", {}).items():
        for row, label in (("graft", "server warm"), ("graft_server_cold", "server cold")):
            b = _get(per, "single", row, "breakdown")
            if not b:
                continue
            ms = 1000
            lines.append(
                f"  {link:9} {label:12} {b['seconds'] * ms:7.1f} ms: client CPU "
                f"{b['client_cpu'] * ms:5.1f}, server CPU {b['server_cpu'] * ms:6.1f}, "
                f"object store {b['store_requests']:g} req / {b['store_wall'] * ms:6.1f} ms in "
                f"flight (SeaweedFS CPU {b['store_cpu'] * ms:5.1f}), link wait "
                f"{(b['link_delay'] + b['link_pacing']) * ms:6.1f}, link busy "
                f"{b['link_requests_wall'] * ms:6.1f}"
                + (f", direct S3 {b['direct_requests']:g} req" if b.get("direct_requests") else "")
            )
    return lines


def passthrough_lines(r: dict) -> list[str]:
    """``benchmarks/warm.py``'s section: its own ``rows`` as a table, else its keys."""
    p = r.get("passthrough")
    if p is None:
        return []
    if "skipped" in p:
        return [f"  {p['skipped']}"]
    rows = p.get("rows")
    if isinstance(rows, list) and rows and all("seconds" in x for x in rows):
        from benchmarks import warm  # its own table: medians in ms and the ratios

        return ["  " + line for line in warm.table(p).splitlines()]
    if isinstance(rows, list) and rows and all(isinstance(x, dict) for x in rows):
        cols = list(dict.fromkeys(k for row in rows for k in row))
        out = ["  " + " | ".join(cols)]
        out += ["  " + " | ".join(_cell(row.get(c)) for c in cols) for row in rows]
        return out
    return [f"  {k}: {_cell(v)}" for k, v in _flat(p)]


def _flat(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)


def fragmented_lines(r: dict) -> list[str]:
    f = r.get("fragmented")
    if not f:
        return []
    lines = []
    for link, per in f.items():
        if not isinstance(per, dict):
            continue
        for kind in ("lookups", "scan"):
            res = per.get(kind, {})
            g = res.get("graft")
            if not g:
                continue
            fresh = _get(r, "cold", link, kind, "graft", "seconds")
            vs = f" ({g['seconds'] / fresh:.2f}x a fresh volume's)" if fresh else ""
            line = (
                f"  {link:9} {WORKLOADS[kind]:18} {_secs(g['seconds'])} s{vs}, "
                f"{g['requests']} requests, {_mb(g['bytes_down'])} MB"
            )
            c = res.get("graft_server_cold")
            if c:
                line += (
                    f"; server cold: {_secs(c['seconds'])} s, {c['store_requests']} store requests"
                )
            if not res.get("results_agree", True):
                line += "  !! rows differ from native SQLite"
            lines.append(line)
    return lines


# -- text -----------------------------------------------------------------------------


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f}" if b < 100e6 else f"{b / 1e6:.0f}"


def _secs(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _ratio(x: float) -> str:
    return f"{x:.0f}x" if x >= 10 else f"{x:.1f}x"


def _mark(summary: dict) -> str:
    how = summary.get("how", "measured")
    return "" if how == "measured" else ("*" if how.startswith("extrapolated") else "**")


def text_tables(r: dict) -> str:
    lines: list[str] = []
    m = r["machine"]
    lines.append(
        f"graft-vfs benchmarks ({r['mode']}), {r['finished']}, {r['duration_seconds']:.0f} s"
    )
    lines.append(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Python "
        f"{m['python']}, SQLite {m['sqlite']}"
    )
    d = r["data"]
    lines.append(
        f"data: {d['bytes'] / 1e6:.1f} MB, {d['pages']} pages of 4 KiB "
        f"({', '.join(f'{k} {v}' for k, v in d['tables'].items() if v > 10)})"
    )
    for name, link in r["links"].items():
        lines.append(f"link {name}: {link['description']}")
    lines.append("")
    head = (
        f"{'link':9} {'workload':21} {'system':26} {'seconds':>9} {'1st row':>8} "
        f"{'requests':>9} {'MB down':>8} {'pages':>7} {'vs graft':>9}"
    )
    if r.get("cold"):
        lines.append("COLD READS (fresh client; medians; * extrapolated, ** modelled)")
        lines.append(head)
        lines.append("-" * len(head))
    for link, per in r.get("cold", {}).items():
        for kind, title in WORKLOADS.items():
            res = per.get(kind, {})
            g = _get(res, "graft", "seconds")
            rows = [("graft", res.get("graft")), (SERVER_COLD, res.get("graft_server_cold"))]
            rows += [(k, res.get(k)) for k in ("s3vfs", "download", "native")]
            for sysname, s in rows:
                if not s:
                    continue
                label = SYSTEMS.get(sysname, sysname) + _mark(s)
                ratio = _ratio(s["seconds"] / g) if g and sysname != "graft" else ""
                lines.append(
                    f"{link:9} {title:21} {label:26} {_secs(s['seconds']):>9} "
                    f"{_secs(s['first_row_seconds']):>8} {s['requests']:>9} "
                    f"{_mb(s['bytes_down']):>8} {s['pages']:>7} {ratio:>9}"
                )
            if kind in REFERENCE and res:
                ref = REFERENCE[kind]
                lines.append(
                    f"{link:9} {title:21} {'Graft 0.2.1 (reference)':26} "
                    f"{ref['seconds_text'].get(link, ''):>9} {'':>8} {ref['requests']:>9} "
                    f"{_mb(ref['bytes_down']):>8}"
                )
            if kind == "index20" and res.get("graft"):
                lines.append(
                    f"{link:9} {title:21} graft: {res['graft'].get('round_trips', '?')} round trips"
                )
            if res and not res.get("results_agree", True):
                lines.append(f"{link:9} {title:21} !! systems returned different rows")
            if res.get("same_rows_as_rowid_lookups") is False:
                lines.append(f"{link:9} {title:21} !! not the rows the rowid lookups returned")
        lines.append("")
    one = _get(r, "cold", "loopback", "single", "graft")
    if one:
        lines.append(
            f"one cold lookup (graft): {one['requests']} requests, "
            f"{one['bytes_down'] / 1e3:.1f} kB, {one['pages']} pages, "
            f"{one['seconds'] * 1000:.1f} ms on loopback"
        )
    bd = breakdown_lines(r)
    if bd:
        lines.append("")
        lines.append(
            "ONE COLD LOOKUP, WHERE THE TIME WENT (medians; CPU from /proc, store and link "
            "from the proxies)"
        )
        lines += bd
    fr = fragmented_lines(r)
    if fr:
        f = r["fragmented"]
        lines.append("")
        lines.append(
            f"COLD READS AFTER {f['commits']} SMALL COMMITS (fresh client, server warm; "
            f"commit + push {f['commit_and_push_per_s']:.0f}/s)"
        )
        lines += fr
    w = r.get("warm")
    if w:
        lines.append("")
        lines.append(f"WARM READS ({w['lookups']} random lookups, median of {w['rounds']} rounds)")
        for key, label in (("fresh", "fresh volume"), ("after_history", "after 200 commits")):
            x = w[key]
            lines.append(
                f"  {label:18} native {x['native_per_s']:>9.0f}/s  graft "
                f"{x['graft_per_s']:>9.0f}/s  = {x['ratio']:.2f}x native "
                f"(Graft 0.2.1: {REFERENCE['warm_ratio']}x)"
            )
    wr = r.get("writes")
    if wr and w:
        h = w["history_pushes"]
        lines.append("")
        lines.append("WRITES (loopback)")
        lines.append(
            f"  single-row commits/s: graft {wr['graft_local_commits_per_s']:.0f} (local, "
            f"durable), graft commit+push {h['commit_and_push_per_s']:.0f}, native "
            f"{wr['native_delete_commits_per_s']:.0f} (rollback journal) / "
            f"{wr['native_wal_commits_per_s']:.0f} (WAL), sqlite-s3vfs "
            f"{wr['s3vfs']['per_s']:.1f} ({wr['s3vfs']['requests_per_commit']:.0f} "
            "requests each)"
        )
        lines.append(
            f"  bulk insert of {wr['bulk_rows']} rows: graft {wr['graft_bulk_seconds']:.2f} s "
            f"(+ push {wr['bulk_push']['seconds']:.2f} s), native "
            f"{wr['native_bulk_seconds']:.2f} s"
        )
        lines.append(
            f"  {'push':30} {'pages':>6} {'zstd kB':>8} {'kB sent':>8} {'ratio':>6} "
            f"{'requests':>8} {'obj writes':>10} {'seconds':>8}"
        )
        med = h["median"]
        pushes = [
            (f"single-row commit (median of {h['commits']})", med),
            (f"roll-up of {wr['single_commits']} commits", wr["rollup_push"]),
            (f"bulk insert ({wr['bulk_rows']} rows)", wr["bulk_push"]),
        ]
        for label, p in pushes:
            lines.append(
                f"  {label:30} {p['pages']:>6g} {p['compressed_bytes'] / 1e3:>8.1f} "
                f"{p['bytes_up'] / 1e3:>8.1f} {p['bytes_ratio']:>5.2f}x {p['requests']:>8g} "
                f"{p['object_writes']:>10g} {p['seconds']:>8.3f}"
            )
        lines.append(
            f"  (re-uploading the whole file instead: {wr['full_file_bytes'] / 1e6:.1f} MB "
            "per push)"
        )
    c = r.get("catchup")
    if c:
        lines.append("")
        lines.append("SYNC CATCH-UP (another client changed ~1% of the pages)")
        for link, x in c.items():
            fd = x.get("full_download_seconds")
            lines.append(
                f"  {link:9} {x['changed_pages']} pages changed "
                f"({100 * x['changed_fraction']:.2f}%): {x['seconds']:.3f} s, "
                f"{x['requests']} requests, "
                f"{x['bytes_down'] / 1e6:.2f} MB = {100 * x['bytes_vs_full_download']:.2f}% of a "
                f"full download ({x['full_download_bytes'] / 1e6:.0f} MB"
                + (f", {_secs(fd)} s" if fd else "")
                + ")"
            )
    pf = prefetch_lines(r)
    if pf:
        lines.append("")
        lines.append("ONE B-TREE AGAINST THE WHOLE VOLUME (fresh client, server warm)")
        lines += [f"  {line}" for line in pf]
    pt = passthrough_lines(r)
    if pt:
        lines.append("")
        lines.append("WARM PATH AGAINST A PASS-THROUGH VFS (benchmarks/warm.py)")
        lines += pt
    lines.append("")
    lines.append("TARGETS")
    for t in targets(r):
        met = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        lines.append(f"  [{met:7}] {t['target']}: {t['measured']}")
    return "\n".join(lines)


# -- markdown -------------------------------------------------------------------------


def markdown(r: dict, image: str = "benchmarks/results/latest.png") -> str:
    m = r["machine"]
    d = r["data"]
    out: list[str] = []
    out.append(
        f"Latest run: `make bench{'-quick' if r['mode'] == 'quick' else ''}` on "
        f"{r['finished'][:10]}, {r['duration_seconds']:.0f} s, on {m['cpu']} ({m['cores']} "
        f"cores, {m['memory_gb']} GB), Python {m['python']}, SQLite {m['sqlite']}; "
        f"{d['bytes'] / 1e6:.0f} MB database ({d['pages']} pages). Medians of repeated runs; "
        "`*` extrapolated from the lookups that fit the time budget, `**` computed from the "
        "loopback run with the link model. Graft 0.2.1 figures are quoted from issues 4 and 11 "
        "(measured elsewhere), not measured here."
    )
    out.append("")
    out.append(f"![benchmark plot]({image})")
    out.append("")
    out.append(
        "Cold reads by a fresh client (in brackets: the time / graft's with the server warm; "
        "round trips: periods with requests in flight, parallel ones counted once):"
    )
    out.append("")
    out.append(
        "| workload | link | graft, server warm | graft, server cold on S3 | sqlite-s3vfs "
        "| full download | native local | Graft 0.2.1 (ref.) |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for kind, title in WORKLOADS.items():
        for link, per in r.get("cold", {}).items():
            res = per.get(kind, {})
            g = _get(res, "graft")
            if not g:
                continue
            trips = f", {g.get('round_trips', '?')} round trips" if kind == "index20" else ""
            cells = [
                f"{_secs(g['seconds'])} s, {g['requests']} req{trips}, {_mb(g['bytes_down'])} MB"
            ]
            c = res.get("graft_server_cold")
            cells.append(
                f"{_secs(c['seconds'])} s ({_ratio(c['seconds'] / g['seconds'])}), "
                f"{c['store_requests']} store req"
                if c
                else ""
            )
            for k in ("s3vfs", "download"):
                s = res.get(k)
                cells.append(
                    f"{_secs(s['seconds'])} s{_mark(s)} ({_ratio(s['seconds'] / g['seconds'])}), "
                    f"{_mb(s['bytes_down'])} MB"
                    if s
                    else ""
                )
            n = res.get("native")
            cells.append(f"{_secs(n['seconds'])} s" if n else "")
            ref = ""
            if kind in REFERENCE:
                rl = REFERENCE[kind]
                ref = f"{rl['seconds_text'].get(link, '')} s, {rl['requests']} req, 5.47 MB"
            agree = "" if res.get("results_agree", True) else " **(rows differ!)**"
            out.append(f"| {title}{agree} | {link} | " + " | ".join(cells) + f" | {ref} |")
    out.append("")
    bd = breakdown_lines(r)
    if bd:
        out.append(
            "One cold lookup (fresh client, median of "
            f"{_get(r, 'config', 'breakdown_reps', default='several')} runs), where its time "
            "went: client CPU is this process's `time.process_time`, server and SeaweedFS CPU "
            "come from `/proc/PID/stat`, object-store requests and the wall time they were in "
            "flight from the proxy between server and store, link wait is the delay and "
            "bandwidth pacing the link proxy applied:"
        )
        out.append("")
        out.append("```")
        out += [line.strip() for line in bd]
        out.append("```")
        out.append("")
    fr = fragmented_lines(r)
    if fr:
        f = r["fragmented"]
        out.append(
            f"Cold reads after {f['commits']} small commits (single-row updates of the rows "
            "these workloads read, each pushed at once; fresh client, server warm):"
        )
        out.append("")
        out += [f"- {line.strip()}" for line in fr]
        out.append("")
    pt = passthrough_lines(r)
    if pt:
        out.append("Warm path against a pass-through VFS (`benchmarks/warm.py`):")
        out.append("")
        rows = r["passthrough"].get("rows")
        if isinstance(rows, list) and rows and all("seconds" in x for x in rows):
            systems = ("native", "pass", "graft", "graft-small")
            out.append(
                "| workload | native | pass-through | graft | graft, 1 MB memory cache "
                "| graft / native (speed) | graft / pass-through (time) |"
            )
            out.append("|---|---|---|---|---|---|---|")
            for row in rows:
                sec = row["seconds"]
                cells = [f"{sec[k] * 1000:,.1f} ms" if k in sec else "" for k in systems]
                out.append(
                    f"| {row['title']} | "
                    + " | ".join(cells)
                    + f" | {row['graft_speed_vs_native']:.2f}x | {row['graft_time_vs_pass']:.2f}x |"
                )
        elif isinstance(rows, list) and len(pt) == len(rows) + 1:  # a table
            out.append(f"| {pt[0].strip()} |")
            out.append("|" + "---|" * (pt[0].count("|") + 1))
            out += [f"| {line.strip()} |" for line in pt[1:]]
        else:
            out += [f"- {line.strip()}" for line in pt]
        out.append("")
    w, wr, c = r.get("warm"), r.get("writes"), r.get("catchup")
    if w:
        out.append(
            f"- Warm lookups ({w['lookups']} random, every page local): "
            f"{w['fresh']['ratio']:.2f}x native SQLite on a fresh volume, "
            f"{w['after_history']['ratio']:.2f}x after 200 commits "
            f"(Graft 0.2.1: {REFERENCE['warm_ratio']}x)."
        )
    if wr and w:
        h = w["history_pushes"]
        out.append(
            f"- Writes (loopback): {wr['graft_local_commits_per_s']:.0f} single-row commits/s "
            f"(durable locally; native: {wr['native_delete_commits_per_s']:.0f} rollback "
            f"journal, {wr['native_wal_commits_per_s']:.0f} WAL; sqlite-s3vfs "
            f"{wr['s3vfs']['per_s']:.1f}), {h['commit_and_push_per_s']:.0f}/s with a push "
            f"after each; a single-row push sends {h['median']['bytes_up'] / 1e3:.1f} kB for "
            f"{h['median']['pages']:g} changed pages ({h['median']['bytes_ratio']:.2f}x their "
            f"zstd size) in {h['median']['requests']:g} request(s) and "
            f"{h['median']['object_writes']:g} object writes (max {h['max']['object_writes']}); "
            f"bulk insert of {wr['bulk_rows']} rows {wr['graft_bulk_seconds']:.2f} s "
            f"(native {wr['native_bulk_seconds']:.2f} s), its push "
            f"{wr['bulk_push']['seconds']:.2f} s, {wr['bulk_push']['object_writes']} object "
            f"writes, {wr['bulk_push']['bytes_ratio']:.2f}x the changed pages' zstd size."
        )
    if c:
        parts = [
            f"{link} {x['seconds']:.2f} s, {x['bytes_down'] / 1e6:.2f} MB "
            f"({100 * x['bytes_vs_full_download']:.2f}% of a full download)"
            for link, x in c.items()
        ]
        any_c = next(iter(c.values()))
        out.append(
            f"- Sync catch-up after another client changed {any_c['changed_pages']} pages "
            f"({100 * any_c['changed_fraction']:.1f}%): " + "; ".join(parts) + "."
        )
    pf = prefetch_lines(r)
    if pf:
        out.append(
            "- Fetching one B-tree (`PRAGMA graft_prefetch('orders')`, a fresh client, server "
            "warm; `**` computed from loopback) next to every page of the volume "
            "(`PRAGMA graft_hydrate`):"
        )
        out += [f"  - {line.strip()}" for line in pf]
    out.append("")
    out.append("| target (issues 4 and 11) | this run | met |")
    out.append("|---|---|---|")
    for t in targets(r):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        out.append(
            f"| {t['target'].replace('<=', '≤').replace('>=', '≥')} | {t['measured']} | {met} |"
        )
    return "\n".join(out)


def update_readme(r: dict, readme: str = README) -> None:
    with open(readme) as f:
        text = f.read()
    block = f"{BEGIN}\n{markdown(r)}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme} has no benchmark markers ({BEGIN} ... {END})")
    with open(readme, "w") as f:
        f.write(pattern.sub(lambda _: block, text))


# -- plot -----------------------------------------------------------------------------


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, NullFormatter

    links = list(r["cold"])
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    colors = {
        "graft": "#2a7ab9",
        "graft_server_cold": "#9ecae1",
        "s3vfs": "#d95f02",
        "download": "#7570b3",
        "native": "#66a61e",
        "reference": "#999999",
    }

    def bars(
        ax, kind: str, key: str, scale: float, ylabel: str, title: str, log: bool = True
    ) -> None:
        systems = ["graft", "s3vfs", "download"]
        if kind == "lookups":
            systems = ["graft", "graft_server_cold", "s3vfs", "download", "reference"]
        width = 0.8 / len(systems)
        for i, s in enumerate(systems):
            xs = [x + (i - (len(systems) - 1) / 2) * width for x in range(len(links))]
            for x, link in zip(xs, links):
                if s == "reference":
                    ref = REFERENCE["lookups"]
                    v, how = (ref["seconds"][link] if key == "seconds" else ref[key]), "ref"
                else:
                    summary = _get(r["cold"], link, kind, s) or {}
                    v, how = summary.get(key, 0), summary.get("how", "measured")
                v /= scale
                if not v:
                    continue
                ax.bar(
                    x,
                    v,
                    width,
                    color=colors[s],
                    hatch="" if how in ("measured", "ref") else "//",
                    edgecolor="white",
                )
                ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(links)), links)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)

    bars(axes[0][0], "lookups", "seconds", 1, "seconds (log)", "100 random cold lookups: time")
    bars(
        axes[0][1],
        "lookups",
        "bytes_down",
        1e6,
        "MB (log)",
        "100 random cold lookups: bytes over the link",
    )
    bars(axes[0][2], "scan", "seconds", 1, "seconds (log)", "cold range scan (wide table): time")
    bars(
        axes[1][0],
        "aggregate",
        "seconds",
        1,
        "seconds",
        "cold full-table aggregate (orders): time",
        log=False,
    )
    handles = [Patch(color=colors[s], label=SYSTEMS[s]) for s in ("graft", "s3vfs", "download")]
    handles.insert(1, Patch(color=colors["graft_server_cold"], label=SERVER_COLD))
    handles.append(Patch(color=colors["reference"], label="Graft 0.2.1 (issue 4, reference)"))
    handles.append(
        Patch(facecolor="#cccccc", hatch="//", edgecolor="white", label="extrapolated / modelled")
    )
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9)

    ax = axes[1][1]
    w = r.get("warm")
    if w:
        labels = [
            "native\n(fresh)",
            "graft\nfresh",
            "native\n(2nd run)",
            "graft after\n200 commits",
        ]
        vals = [
            w["fresh"]["native_per_s"],
            w["fresh"]["graft_per_s"],
            w["after_history"]["native_per_s"],
            w["after_history"]["graft_per_s"],
        ]
        notes = ["", f"{w['fresh']['ratio']:.2f}x", "", f"{w['after_history']['ratio']:.2f}x"]
        ax.bar(labels, vals, color=[colors["native"], colors["graft"]] * 2)
        for i, (v, note) in enumerate(zip(vals, notes)):
            ax.annotate(
                f"{v:,.0f}/s" + (f"\n{note} native" if note else ""),
                (i, v),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylim(0, max(vals) * 1.2)
        ax.set_title("warm lookups per second (every page local)", fontsize=10)

    ax = axes[1][2]
    c = r.get("catchup")
    if c:
        xs = range(len(c))
        ax.bar(
            [x - 0.2 for x in xs],
            [x["bytes_down"] / 1e6 for x in c.values()],
            0.4,
            label="graft catch-up (pull + changed pages)",
            color=colors["graft"],
        )
        ax.bar(
            [x + 0.2 for x in xs],
            [x["full_download_bytes"] / 1e6 for x in c.values()],
            0.4,
            label="full download",
            color=colors["download"],
        )
        for x, v in zip(xs, c.values()):
            ax.annotate(
                f"{v['bytes_down'] / 1e6:.2f} MB\n{v['seconds']:.2f} s",
                (x - 0.2, v["bytes_down"] / 1e6),
                ha="center",
                va="bottom",
                fontsize=7,
            )
            fd = v.get("full_download_seconds")
            ax.annotate(
                f"{v['full_download_bytes'] / 1e6:.0f} MB" + (f"\n{fd:.3g} s" if fd else ""),
                (x + 0.2, v["full_download_bytes"] / 1e6),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(list(xs), list(c))
        ax.set_yscale("log")
        ax.set_ylim(top=max(x["full_download_bytes"] for x in c.values()) / 1e6 * 20)
        ax.set_ylabel("MB (log)")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title("sync catch-up after another client changed 1% of the pages", fontsize=10)

    m = r["machine"]
    fig.suptitle(
        f"graft-vfs benchmarks ({r['mode']}, {r['finished'][:10]}): "
        f"{r['data']['bytes'] / 1e6:.0f} MB database; {m['cpu']}, {m['cores']} cores, "
        f"Python {m['python']}, SQLite {m['sqlite']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", nargs="?", default=RESULTS)
    parser.add_argument("--readme", action="store_true", help="rewrite README's benchmark section")
    parser.add_argument("--plot", help="also draw the plot to this PNG path")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        r = json.load(f)
    if args.readme:
        update_readme(r)
        print(f"updated {README}")
    if args.plot:
        plot(r, args.plot)
    print(text_tables(r))


if __name__ == "__main__":
    main(sys.argv[1:])
