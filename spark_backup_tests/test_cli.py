"""The command line: output scripts can parse, exit codes scripts can rely on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from spark_backup_tests.helpers import (
    SPARK_BACKUP,
    config_source,
    make_key,
    plan_dict,
    run_cli,
    write_plan,
)


def test_backup_list_verify_restore(
    local_plan: Path, age_key, estate: Path, tmp_path: Path
) -> None:
    plan = str(local_plan)
    backed_up = run_cli("--plan", plan, "backup", "dgx_config", "--json", check=True)
    (manifest,) = json.loads(backed_up.stdout)
    assert manifest["source"] == "dgx_config" and manifest["stored"]["bytes"] > 0

    listed = json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout)
    assert [c["id"] for c in listed] == [manifest["id"]]
    assert listed[0]["stored_sha256"] == manifest["stored"]["sha256"]
    assert (
        json.loads(run_cli("--plan", plan, "list", "dgx_config", "--json", check=True).stdout)
        == listed
    )

    verified = json.loads(run_cli("--plan", plan, "verify", "--json", check=True).stdout)
    assert verified[0]["ok"] and not verified[0]["deep"]
    deep = run_cli(
        "--plan", plan, "verify", manifest["id"], "--deep", "--json", "--identity", str(age_key[0])
    )
    assert deep.returncode == 0 and json.loads(deep.stdout)[0]["deep"]

    def restore() -> subprocess.CompletedProcess[str]:
        target, key = str(tmp_path / "r"), str(age_key[0])
        return run_cli(
            "--plan", plan, "restore", manifest["id"], "--to", target, "--identity", key, "--json"
        )

    summary = json.loads(restore().stdout)
    assert summary["files"] == 5 and summary["target"] == str(tmp_path / "r")
    again = restore()
    assert again.returncode == 7 and "restore would overwrite" in again.stderr


def test_exit_codes(local_plan: Path, tmp_path: Path) -> None:
    plan = str(local_plan)
    assert run_cli("--plan", plan, "backup").returncode == 2  # usage: no source named
    missing = run_cli("--plan", plan, "backup", "nope")
    assert missing.returncode == 4 and "source 'nope' is not in the plan" in missing.stderr
    unknown = run_cli(
        "--plan",
        plan,
        "restore",
        "dgx_config-20260101T000000.000Z-00000000",
        "--to",
        str(tmp_path / "r"),
    )
    assert unknown.returncode == 4
    no_key = run_cli("--plan", plan, "verify", "--deep", env={"SPARK_BACKUP_IDENTITY_FILE": ""})
    assert no_key.returncode == 8 and "no age identity" in no_key.stderr
    assert run_cli("--plan", str(tmp_path / "absent.yaml"), "list").returncode == 2
    run_cli("--plan", plan, "backup", "dgx_config", check=True)
    other, _ = make_key(tmp_path, "other")
    wrong_key = run_cli("--plan", plan, "verify", "--identity", str(other))
    assert (
        wrong_key.returncode == 8
        and "none of the given age identities opens it" in wrong_key.stderr
    )


def test_verify_exit_code_3_when_a_copy_is_damaged(local_plan: Path) -> None:
    plan = str(local_plan)
    (manifest,) = json.loads(
        run_cli("--plan", plan, "backup", "--all", "--json", check=True).stdout
    )
    data = local_plan.parent / "store" / manifest["data_key"]
    data.write_bytes(data.read_bytes()[:-1])
    result = run_cli("--plan", plan, "verify", "--json")
    assert result.returncode == 3
    (outcome,) = json.loads(result.stdout)
    assert not outcome["ok"] and "do not match the manifest" in outcome["error"]


def test_identity_from_environment(local_plan: Path, age_key, tmp_path: Path) -> None:
    plan = str(local_plan)
    (manifest,) = json.loads(
        run_cli("--plan", plan, "backup", "dgx_config", "--json", check=True).stdout
    )
    key_text = age_key[0].read_text()
    result = run_cli(
        "--plan",
        plan,
        "restore",
        manifest["id"],
        "--to",
        str(tmp_path / "r"),
        env={"SPARK_BACKUP_IDENTITY": key_text},
    )
    assert result.returncode == 0, result.stderr
    secret_line = next(line for line in key_text.splitlines() if line.startswith("AGE-SECRET-KEY"))
    assert secret_line not in result.stdout + result.stderr


def _big_estate(tmp_path: Path, megabytes: int = 192) -> Path:
    """An incompressible file large enough that a backup or restore takes a moment."""
    big = tmp_path / "estate" / "models"
    big.mkdir(parents=True)
    with open(big / "weights.bin", "wb") as handle:
        for _ in range(megabytes // 4):
            handle.write(os.urandom(4 << 20))
    return big


def test_killed_backup_leaves_no_copy_and_next_run_succeeds(tmp_path: Path, age_key) -> None:
    """Kopia-style crash test: SIGKILL in the middle of writing a copy, then list, prune, retry."""
    big = _big_estate(tmp_path)
    plan = write_plan(
        tmp_path,
        plan_dict(
            [age_key[1]], [config_source("models", [str(big)])], defaults={"orphan_grace": "1h"}
        ),
    )
    process = subprocess.Popen(
        [*SPARK_BACKUP, "--no-progress", "--plan", str(plan), "backup", "models"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = tmp_path / "store"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        partial = [
            p for p in store.rglob("*") if ".partial-" in p.name and p.stat().st_size > (1 << 20)
        ]
        if partial:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert partial, "the backup never started writing"
    assert not list(store.rglob("*.json"))

    assert json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout) == []
    prune = ("--plan", str(plan), "prune", "--apply", "--json")
    # Within the grace the leftover may belong to a backup still running: it stays.
    assert json.loads(run_cli(*prune, check=True).stdout)["incomplete_uploads"] == []
    assert all(p.exists() for p in partial)
    two_hours_ago = time.time() - 7200
    for leftover in partial:
        os.utime(leftover, (two_hours_ago, two_hours_ago))
    pruned = json.loads(run_cli(*prune, check=True).stdout)
    assert pruned["incomplete_uploads"] and not [p for p in store.rglob("*") if p.is_file()]
    run_cli("--plan", str(plan), "backup", "models", check=True)
    verified = json.loads(
        run_cli(
            "--plan",
            str(plan),
            "verify",
            "--json",
            "--deep",
            "--identity",
            str(age_key[0]),
            check=True,
        ).stdout
    )
    assert [v["ok"] for v in verified] == [True]


def test_prune_dry_run_then_apply(local_plan: Path) -> None:
    plan = str(local_plan)
    text = local_plan.read_text().replace(
        "sources:", "defaults:\n  retention: {daily: 1, weekly: 0, monthly: 0}\nsources:"
    )
    local_plan.write_text(text)
    ids = [
        json.loads(run_cli("--plan", plan, "backup", "dgx_config", "--json", check=True).stdout)[0][
            "id"
        ]
        for _ in range(3)
    ]
    dry = json.loads(run_cli("--plan", plan, "prune", "--json", check=True).stdout)
    assert dry["dry_run"] and sorted(dry["expired"]) == sorted(ids[:2])
    assert len(json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout)) == 3
    applied = json.loads(run_cli("--plan", plan, "prune", "--apply", "--json", check=True).stdout)
    assert sorted(applied["expired"]) == sorted(ids[:2])
    assert [
        c["id"] for c in json.loads(run_cli("--plan", plan, "list", "--json", check=True).stdout)
    ] == ids[2:]


def test_interrupted_restore_publishes_nothing_and_leaves_no_worker(
    tmp_path: Path, age_key
) -> None:
    big = _big_estate(tmp_path)
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [config_source("models", [str(big)])]))
    (manifest,) = json.loads(
        run_cli("--plan", str(plan), "backup", "models", "--json", check=True).stdout
    )
    target = tmp_path / "restore"
    process = subprocess.Popen(
        [
            *SPARK_BACKUP,
            "--no-progress",
            "--plan",
            str(plan),
            "restore",
            manifest["id"],
            "--to",
            str(target),
            "--identity",
            str(age_key[0]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C goes to the whole foreground process group: the worker gets it too.
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(target.rglob("weights.bin")):
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGINT)
    _out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    # The staging folder is gone, nothing was published, and the target this restore created
    # is removed again.
    assert not target.exists()
    # Only this restore's session: other runs on the machine may have workers of their own.
    workers = subprocess.run(
        ["pgrep", "-s", str(process.pid), "-f", "spark_backup.engine.age_worker"],
        capture_output=True,
    )
    assert workers.stdout == b""


def test_backup_checks_partition_keys(local_plan: Path) -> None:
    plan = str(local_plan)
    not_a_date = run_cli("--plan", plan, "backup", "dgx_config", "--partition", "banana")
    assert not_a_date.returncode == 2 and "partition 'banana' is not a date" in not_a_date.stderr
    tuesday = run_cli("--plan", plan, "backup", "dgx_config", "--partition", "2026-11-24")
    assert tuesday.returncode == 2 and "does not start a weekly partition" in tuesday.stderr
    monday = run_cli("--plan", plan, "backup", "dgx_config", "--partition", "2026-11-16", "--json")
    assert json.loads(monday.stdout)[0]["partition"] == "2026-11-16"


def test_one_failing_source_does_not_stop_the_others(tmp_path: Path, age_key, estate: Path) -> None:
    sources = [
        config_source("vpn_config", [str(tmp_path / "missing")]),
        config_source("dgx_config", [str(estate)]),
    ]
    plan = str(write_plan(tmp_path, plan_dict([age_key[1]], sources)))
    result = run_cli("--plan", plan, "backup", "--all", "--json")
    assert result.returncode == 6
    assert "source 'vpn_config': path" in result.stderr
    assert [m["source"] for m in json.loads(result.stdout)] == ["dgx_config"]


def test_a_truncated_manifest_fails_only_its_own_copy(tmp_path: Path, age_key) -> None:
    """One damaged manifest must not stop list, verify or prune for anything else: it is named
    (exit 3), and every other copy of every source lists, verifies and prunes."""
    estate = tmp_path / "estate"
    (estate / "a").mkdir(parents=True)
    (estate / "a" / "file").write_text("a\n")
    sources = [
        config_source(
            "alpha", [str(estate / "a")], retention={"daily": 1, "weekly": 0, "monthly": 0}
        ),
        config_source(
            "beta", [str(estate / "a")], retention={"daily": 1, "weekly": 0, "monthly": 0}
        ),
    ]
    plan = str(write_plan(tmp_path, plan_dict([age_key[1]], sources)))
    made = {}
    for name in ("alpha", "alpha", "beta", "beta"):
        made.setdefault(name, []).append(
            json.loads(run_cli("--plan", plan, "backup", name, "--json", check=True).stdout)[0]
        )
    damaged = made["alpha"][0]["id"]
    manifest = tmp_path / "store" / "alpha" / "manifests" / f"{damaged}.json"
    manifest.write_bytes(manifest.read_bytes()[:40])

    for args in (("list",), ("list", "alpha")):
        listed = run_cli("--plan", plan, *args, "--json")
        assert listed.returncode == 3, listed.stderr
        rows = json.loads(listed.stdout)
        assert {r["id"] for r in rows if "damaged" not in r} >= {made["alpha"][1]["id"]}
        assert [r["id"] for r in rows if "damaged" in r] == [damaged]
        assert "not valid JSON" in next(r for r in rows if "damaged" in r)["damaged"]
    everything = json.loads(run_cli("--plan", plan, "list", "--json").stdout)
    assert len([r for r in everything if "damaged" not in r]) == 3

    verified = run_cli("--plan", plan, "verify", "alpha", "--json")
    assert verified.returncode == 3
    outcomes = {o["copy_id"]: o["ok"] for o in json.loads(verified.stdout)}
    assert outcomes == {damaged: False, made["alpha"][1]["id"]: True}
    assert run_cli("--plan", plan, "verify", "beta").returncode == 0

    pruned = run_cli("--plan", plan, "prune", "--apply", "--json")
    assert pruned.returncode == 3  # done, but something needs a look
    report = json.loads(pruned.stdout)
    assert report["expired"] == [made["beta"][0]["id"]]  # retention went on for the others
    assert len(report["damaged"]) == 1 and damaged in report["damaged"][0]
    assert manifest.exists()  # a copy whose manifest cannot be read is never deleted
    assert (tmp_path / "store" / "alpha" / "data" / f"{damaged}.tar.zst.age").exists()


def test_restore_with_a_wrong_key_leaves_no_folder(local_plan: Path, tmp_path: Path) -> None:
    plan = str(local_plan)
    (manifest,) = json.loads(
        run_cli("--plan", plan, "backup", "dgx_config", "--json", check=True).stdout
    )
    other, _public = make_key(tmp_path / "other")
    target = tmp_path / "restore" / "here"
    result = run_cli(
        "--plan", plan, "restore", manifest["id"], "--to", str(target), "--identity", str(other)
    )
    assert result.returncode == 8, result.stderr
    assert "none of the given age identities opens it" in result.stderr
    assert not (tmp_path / "restore").exists()


def test_verify_says_which_checks_ran(local_plan: Path, age_key) -> None:
    plan = str(local_plan)
    run_cli("--plan", plan, "backup", "dgx_config", check=True)
    plain = run_cli("--plan", plan, "verify", check=True).stdout
    deep = run_cli("--plan", plan, "verify", "--identity", str(age_key[0]), check=True).stdout
    assert "plain verify: stored sha256 and size" in plain
    assert "deep verify:" in deep and "plaintext sha256 and size" in deep and "age" in deep
