"""`hndsr registry`: register, gate and promote the pipeline's model; show the registry; roll back.

    hndsr registry promote  [--report reports/promotion.json] [--allow-reject]
    hndsr registry promote  --version N [--reason TEXT]   gate a registered version again
    hndsr registry register
    hndsr registry status   [--json]
    hndsr registry rollback --reason TEXT
    hndsr registry promote  --to candidate [--version N]  gate, then start a gradual roll-out
    hndsr registry rollout  status [--server URL] | promote [--reason TEXT] | abort --reason TEXT

A version that was rolled back is never brought back by the pipeline's promotion of the same weights; after
fixing what made you roll it back, `promote --version N --reason "what was fixed"` runs the full gate on it
and, if it passes, moves the alias and records the reason.

Exit status: 0 done (promote: promoted, or already the production version); 3 the gate rejected the candidate
(0 with --allow-reject, which the `promote` DVC stage uses so `dvc repro` completes and records the decision);
1 an error the message explains (tracking server unreachable, no registered model, no evaluation metrics);
2 bad params or arguments.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import UTC, datetime

from hndsr.cli import Command

REJECTED = 3
KEY_METRICS = ("psnr", "ssim")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[0] + (
        "\n\nThe registry is the one at MLFLOW_TRACKING_URI (default: sqlite:///mlflow.db in the current folder); "
        "gate thresholds, model name and alias come from the `promote` section of the params file.")
    parser.epilog = __doc__.split("\n\n", 2)[2]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    promote = actions.add_parser("promote", parents=[common],
                                 help="register the model in models/ and move the alias if it passes the gate")
    promote.add_argument("--report", default=None,
                         help="where the decision and every check go (default: reports/promotion.json, the "
                              "pipeline's; with --version or --to another alias, only the MLflow run and the version's tags record it)")
    promote.add_argument("--version", metavar="N",
                         help="gate registered version N again instead of the pipeline's model (its checkpoints "
                              "and test metrics come from the registry)")
    promote.add_argument("--to", metavar="ALIAS",
                         help="the alias a pass moves (default: the params' production alias); `--to candidate` "
                              "starts a gradual roll-out that servers with HNDSR_CANARY_WEIGHT route a share to")
    promote.add_argument("--reason", metavar="TEXT",
                         help="why (recorded on the version); required to bring back a version that was rolled back")
    promote.add_argument("--summary", metavar="PATH",
                         help="append the gate's table (Markdown) to PATH, e.g. $GITHUB_STEP_SUMMARY")
    promote.add_argument("--allow-reject", action="store_true",
                         help="exit 0 when the gate rejects the candidate (the decision is still recorded)")
    actions.add_parser("register", parents=[common], help="register the model in models/ without gating it "
                                                          "(tagged pending)")
    status = actions.add_parser("status", parents=[common],
                                help="every version with its aliases, key metrics and gate decision")
    status.add_argument("--json", action="store_true", help="machine-readable: model, aliases, versions with tags")
    rollback = actions.add_parser("rollback", parents=[common],
                                  help="move the alias back to the version the current one replaced")
    rollback.add_argument("--reason", required=True, metavar="TEXT",
                          help="why (recorded on the version taken out; shown by `status` and by the gate)")
    rollout = actions.add_parser("rollout", parents=[common], help="a gradual roll-out (candidate alias): status, "
                                 "promote (finish it), abort")
    rollout.add_argument("step", choices=("status", "promote", "abort"),
                         help="status: both versions, with --server the live numbers; promote: gate the candidate "
                              "against production, move production to it, remove the candidate alias; abort: "
                              "remove the candidate alias")
    rollout.add_argument("--alias", default="candidate", help="the roll-out's alias (default: %(default)s)")
    rollout.add_argument("--server", metavar="URL", help="status: a running `hndsr serve` to read live numbers from")
    rollout.add_argument("--reason", metavar="TEXT", help="why (recorded; required by abort)")
    rollout.add_argument("--json", action="store_true", help="status: machine-readable")


def _terminated(signum, frame) -> None:
    """SIGTERM (CI cancelling a job, `kill`, an orchestrator) as an exception, so what is open is closed on the way
    out: the MLflow run ends FAILED instead of RUNNING forever, a version registered by this run is deleted."""
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _terminated)
    if args.action == "promote":
        return _promote(args)
    if args.action == "register":
        return _register(args)
    if args.action == "status":
        return _status(args)
    if args.action == "rollout":
        return _rollout(args)
    return _rollback(args)


def _promote(args) -> int:
    from registry.promote import promote

    if args.reason is not None and args.version is None:
        print("hndsr registry promote: error: --reason goes with --version N (the pipeline's promotion records "
              "its own evidence)", file=sys.stderr)
        return 2
    from registry.config import load_promote

    # reports/promotion.json is the pipeline's promote stage output: the production gate of the pipeline's model.
    # A version by number, or a roll-out (--to candidate), writes it only when asked (--report).
    to_production = args.to is None or args.to == load_promote(args.params).alias
    report_path = args.report or ("reports/promotion.json" if args.version is None and to_production else None)
    report = promote(args.params, report_path, version=args.version, reason=args.reason, to=args.to)
    table = format_table(report)
    print(table)
    if args.summary:
        with open(args.summary, "a", encoding="utf-8") as summary:
            summary.write(table + "\n\n")
    version, alias = report["version"], report["alias"]
    if report["decision"] == "promoted":
        replaced = f" (was v{report['replaced']})" if report["replaced"] else ""
        why = f"; reason recorded: {args.reason}" if args.reason else ""
        print(f"promote: v{version} passed the gate; {alias} -> v{version}{replaced}{why}")
    elif report["decision"] == "unchanged":
        print(f"promote: v{version} passed the gate and already holds {alias}")
    else:
        now = f"v{report['production_after']}" if report["production_after"] else "no version"
        moved = "" if alias == report["production_alias"] else f"{alias} not moved; "
        print(f"promote: v{version} REJECTED ({'; '.join(report['reasons'])}); {moved}"
              f"{report['production_alias']} stays on {now}")
        return 0 if args.allow_reject else REJECTED
    return 0


def _rollout(args) -> int:
    from registry.promote import rollout_abort, rollout_promote, rollout_status

    if args.step == "abort":
        if not args.reason:
            print("hndsr registry rollout abort: error: say why with --reason (it is recorded)", file=sys.stderr)
            return 2
        version = rollout_abort(args.params, args.alias, args.reason)
        print(f"rollout: aborted; {args.alias} (v{version}) removed, production unchanged. Servers stop routing "
              "to it at their next poll")
        return 0
    if args.step == "promote":
        report = rollout_promote(args.params, args.alias, args.reason)
        print(format_table(report))
        if report["decision"] == "rejected":
            print(f"rollout: v{report['version']} REJECTED ({'; '.join(report['reasons'])}); production stays on "
                  f"v{report['production_after']}, {args.alias} kept")
            return REJECTED
        print(f"rollout: finished; production -> v{report['version']}"
              + (f" (was v{report['replaced']})" if report["replaced"] else "") + f"; {args.alias} removed")
        return 0
    document = rollout_status(args.params, args.alias, args.server)
    if args.json:
        json.dump(document, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    live = (document.get("live") or {}).get("versions", {})
    for role, entry in document["versions"].items():
        if entry["version"] is None:
            print(f"{role:<10} {entry['alias']}: none")
            continue
        line = f"{role:<10} {entry['alias']}: v{entry['version']} (gate: {entry['gate']})"
        now = live.get(entry["version"])
        if now:
            line += (f"; live over {document['live']['window_s']:g} s: {now['requests']} requests, "
                     f"{now['server_errors']} server errors ({now['error_ratio']:.1%}), p95 "
                     + (f"{now['p95_s_per_megapixel']:.3f} s per output megapixel" if now["p95_s_per_megapixel"]
                        is not None else "-"))
        if entry["backed_out"]:
            line += f"; BACKED OUT on {entry['backed_out'].get('at')}: {entry['backed_out'].get('reason')}"
        print(line)
    if document.get("live"):
        print(f"server: canary weight {document['live']['weight']:g}"
              + (f", backed out: {document['live']['backed_out']}" if document["live"].get("backed_out") else ""))
    return 0


def _register(args) -> int:
    from hndsr.params import load_common
    from registry.config import load_promote
    from registry.promote import load_candidate, register
    from registry.store import Registry

    params, common = load_promote(args.params), load_common(args.params)
    registry = Registry(params.model_name)
    candidate = load_candidate(common.models_dir, common.metrics_dir)
    version, created = register(registry, candidate, args.params, common.experiment)
    print(f"register: {params.model_name} v{version.version} "
          f"{'registered' if created else 'already held these weights'} (gate: {version.tags.get('gate.decision')})")
    return 0


def _rollback(args) -> int:
    from registry.config import load_promote
    from registry.promote import rollback

    params = load_promote(args.params)
    was, now = rollback(args.params, args.reason)
    print(f"rollback: {params.model_name} {params.alias} now points to v{now} (was v{was}); reason recorded on "
          f"v{was}. To serve v{was} again once fixed: hndsr registry promote --version {was} --reason '...'")
    return 0


def _status(args) -> int:
    from registry.config import load_promote
    from registry.store import Registry, redact, scores_from_tags

    params = load_promote(args.params)
    registry = Registry(params.model_name, must_exist=True)
    aliases, versions = registry.aliases(), registry.versions()
    if args.json:
        document = {
            "model": params.model_name,
            "tracking_uri": redact(registry.uri),
            "aliases": aliases,
            "versions": [{"version": v.version, "aliases": list(v.aliases), "status": v.status,
                          "state": version_state(v, params.alias),
                          "run_id": v.run_id, "source": v.source, "created": _iso(v.created_ms), "tags": v.tags}
                         for v in versions],
        }
        json.dump(document, sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    print(f"{params.model_name} at {redact(registry.uri)}; aliases: "
          + (", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"))
    scales = sorted({s for v in versions for s in scores_from_tags(v.tags)}, key=float)
    header = ["version", "aliases", "state", *[f"x{s} PSNR (vs bicubic)" for s in scales], "latency", "dataset",
              "created"]
    rows = []
    for v in versions:
        scores = scores_from_tags(v.tags)
        cells = [f"v{v.version}", ",".join(v.aliases) or "-", version_state(v, params.alias)]
        for s in scales:
            m = scores.get(s)
            cells.append(f"{m['psnr']:.2f} ({m['psnr'] - m['bicubic_psnr']:+.2f})" if m and "bicubic_psnr" in m
                         else "-")
        latency = v.tags.get("gate.latency_ms")
        cells += [f"{float(latency):.0f} ms" if latency not in (None, "None") else "-",
                  v.tags.get("dataset_hash", "-")[:12], _iso(v.created_ms)[:19]]
        rows.append(cells)
    print(_table(header, rows))
    for v in versions:
        tags, state = v.tags, version_state(v, params.alias)
        if "rollback.at" in tags:
            print(f"  v{v.version} rolled back on {tags['rollback.at']} to v{tags.get('rollback.to', '?')}: "
                  f"{tags.get('rollback.reason', '')}")
        if tags.get("promoted.reason"):
            print(f"  v{v.version} promoted on {tags.get('promoted.at', '?')}: {tags['promoted.reason']}")
        if state == "rejected":
            print(f"  v{v.version} rejected: {tags.get('gate.reasons', '')}")
    return 0


def version_state(version, alias: str) -> str:
    """What a version is now, in one word: the alias it holds, rolled back (and not brought back), replaced (was
    promoted, later replaced), rejected (its latest gate run failed), or pending (never gated)."""
    tags = version.tags
    backed_out = tags.get("canary.backed_out") == "true"
    if alias in version.aliases:
        return alias
    if version.aliases:  # e.g. candidate: being rolled out (or backed out by the servers while it holds the alias)
        return ",".join(version.aliases) + (" (backed out)" if backed_out else "")
    if backed_out:
        return "backed out"
    if tags.get("rolled_back") == "true":
        return "rolled back"
    decision = tags.get("gate.decision", "pending")
    if decision == "promoted":
        return f"replaced by v{tags['replaced_by']}" if tags.get("replaced_by") else "promoted"
    return decision


def format_table(report: dict) -> str:
    """The gate's checks as a Markdown table (also what CI writes to the job summary)."""
    rows = [[c["name"], "pass" if c["passed"] else "FAIL", c["detail"].replace("|", "/")] for c in report["checks"]]
    before, after = (f"v{v}" if v else "none" for v in (report.get("target_before", report["production_before"]),
                                                         report.get("target_after", report["production_after"])))
    lines = [f"Gate for {report['model']} v{report['version']}: **{report['decision']}** "
             f"({report['alias']}: {before} -> {after})", "",
             "| check | result | detail |", "| --- | --- | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) for r in [header, *rows])


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds") if ms else ""


registry = Command("register the model, gate and promote it (alias production), status, rollback", add_arguments,
                   main)
