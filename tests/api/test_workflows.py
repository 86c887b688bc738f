"""The GitHub workflows: valid YAML with the keys GitHub requires, and the reusable state check
really works when its steps run against a real state repo."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mailstate.compiler.workflow import DEFAULT_USES, WORKFLOW_PATH, state_repo_workflow
from mailstate.state import files
from mailstate.state.datadir import DataDir
from mailstate.state.errors import InvalidInput
from mailstate.state.ops import hash_password
from mailstate.state.store import Store

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / ".github" / "workflows"
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
INPUT_TYPES = {"string": str, "boolean": bool, "number": (int, float)}
# Keys GitHub accepts at the top of a workflow, of a job and of a step.
WORKFLOW_KEYS = {"name", "run-name", "on", "permissions", "env", "defaults", "concurrency", "jobs"}
JOB_KEYS = {
    "name", "needs", "permissions", "if", "runs-on", "environment", "concurrency", "outputs", "env", "defaults",
    "steps", "timeout-minutes", "strategy", "continue-on-error", "container", "services", "uses", "with", "secrets",
}  # fmt: skip
STEP_KEYS = {
    "id",
    "if",
    "name",
    "uses",
    "run",
    "shell",
    "with",
    "env",
    "continue-on-error",
    "timeout-minutes",
    "working-directory",
}


def load(text: str | bytes) -> dict[str, Any]:
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    # PyYAML speaks YAML 1.1, where a bare `on` is the boolean True: map it back.
    if True in doc:
        assert "on" not in doc
        doc["on"] = doc.pop(True)
    return doc


def triggers(doc: dict[str, Any]) -> dict[str, Any]:
    on = doc["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    assert isinstance(on, dict)
    return on


def check_workflow(doc: dict[str, Any], where: str) -> None:
    """The structure GitHub requires of a workflow file."""
    assert set(doc) <= WORKFLOW_KEYS, f"{where}: unknown top-level keys {set(doc) - WORKFLOW_KEYS}"
    assert "on" in doc and triggers(doc), f"{where}: no `on`"
    jobs = doc["jobs"]
    assert isinstance(jobs, dict) and jobs, f"{where}: no jobs"
    for job_id, job in jobs.items():
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", job_id), f"{where}: bad job id {job_id}"
        assert isinstance(job, dict) and set(job) <= JOB_KEYS, (
            f"{where}: job {job_id} has unknown keys {set(job) - JOB_KEYS}"
        )
        assert ("runs-on" in job) != ("uses" in job), f"{where}: job {job_id} needs exactly one of runs-on / uses"
        if "uses" in job:
            assert "steps" not in job
            continue
        steps = job["steps"]
        assert isinstance(steps, list) and steps, f"{where}: job {job_id} has no steps"
        for n, step in enumerate(steps):
            assert isinstance(step, dict) and set(step) <= STEP_KEYS, f"{where}: {job_id} step {n}: unknown keys"
            assert ("uses" in step) != ("run" in step), f"{where}: {job_id} step {n} needs exactly one of uses / run"
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w./-]+@[\w.-]+|\./.+|docker://.+", step["uses"]), step["uses"]
            else:
                assert isinstance(step["run"], str) and step["run"].strip()
            for key in ("with", "env"):
                assert isinstance(step.get(key, {}), dict)
    for text in _strings(doc):
        assert text.count("${{") == text.count("}}"), f"{where}: unbalanced expression in {text!r}"


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in _strings(k) + _strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))


def test_every_workflow_has_the_keys_github_requires() -> None:
    found = workflow_files()
    assert {p.name for p in found} >= {"ci.yml", "state-check.yml"}
    for path in found:
        check_workflow(load(path.read_bytes()), path.name)


def test_the_rendered_state_repo_workflow() -> None:
    rendered = state_repo_workflow()
    assert list(rendered) == [WORKFLOW_PATH] == [".github/workflows/mailstate.yml"]
    doc = load(rendered[WORKFLOW_PATH])
    check_workflow(doc, WORKFLOW_PATH)
    on = triggers(doc)
    assert "pull_request" in on and on["push"] == {"branches": ["main"]}
    (job,) = doc["jobs"].values()
    assert job["uses"] == DEFAULT_USES
    assert job["uses"].split("@")[0].endswith("/.github/workflows/state-check.yml")
    assert (WORKFLOWS / job["uses"].split("@")[0].rsplit("/", 1)[1]).exists()
    assert "with" not in job

    custom = load(
        state_repo_workflow(
            "acme/mailstate/.github/workflows/state-check.yml@v1.2",
            mailstate_spec="mailstate @ git+https://example.invalid/acme/mailstate@v1.2",
            python_version="3.12",
            branch="trunk",
        )[WORKFLOW_PATH]
    )
    check_workflow(custom, WORKFLOW_PATH)
    (job,) = custom["jobs"].values()
    assert job["uses"] == "acme/mailstate/.github/workflows/state-check.yml@v1.2"
    assert job["with"] == {
        "mailstate-spec": "mailstate @ git+https://example.invalid/acme/mailstate@v1.2",
        "python-version": "3.12",
    }
    assert triggers(custom)["push"] == {"branches": ["trunk"]}
    inputs = triggers(load((WORKFLOWS / "state-check.yml").read_bytes()))["workflow_call"]["inputs"]
    assert set(job["with"]) <= set(inputs)
    assert load(state_repo_workflow("./.github/workflows/state-check.yml")[WORKFLOW_PATH])["jobs"]


@pytest.mark.parametrize(
    "uses",
    [
        "",
        "state-check.yml",
        "acme/mailstate/state-check.yml@main",
        "acme/m/.github/workflows/x.yml@main\non: push",
        "a/b/.github/workflows/x.yml@$(id)",
    ],
)
def test_state_repo_workflow_refuses_a_bad_uses(uses: str) -> None:
    with pytest.raises(InvalidInput):
        state_repo_workflow(uses)


def test_state_repo_workflow_refuses_bad_inputs() -> None:
    with pytest.raises(InvalidInput):
        state_repo_workflow(mailstate_spec="x\ny: 1")
    with pytest.raises(InvalidInput):
        state_repo_workflow(branch="main\non: push")


def test_reusable_workflow_declares_typed_inputs() -> None:
    doc = load((WORKFLOWS / "state-check.yml").read_bytes())
    on = triggers(doc)
    assert set(on) == {"workflow_call"}
    inputs = on["workflow_call"]["inputs"]
    assert set(inputs) >= {"mailstate-spec", "python-version"}
    for name, spec in inputs.items():
        assert spec["type"] in INPUT_TYPES, name
        assert isinstance(spec.get("required", False), bool)
        if "default" in spec:
            assert isinstance(spec["default"], INPUT_TYPES[spec["type"]]), name
        assert spec.get("description")
    assert inputs["python-version"]["default"] == "3.11"
    assert inputs["mailstate-spec"]["default"].startswith("mailstate @ git+https://")
    # every ${{ inputs.X }} used is declared
    used = {m.group(1) for text in _strings(doc["jobs"]) for m in re.finditer(r"inputs\.([A-Za-z0-9_-]+)", text)}
    assert used and used <= set(inputs)
    (job,) = doc["jobs"].values()
    checkout = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/checkout@"))
    assert checkout["with"]["fetch-depth"] == 0
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    for command in (
        "mailstate check .",
        "mailstate plan . --base",
        '--markdown >> "$GITHUB_STEP_SUMMARY"',
        "mailstate compile --check .",
    ):
        assert command in runs


def test_project_ci_runs_the_ci_script() -> None:
    doc = load((WORKFLOWS / "ci.yml").read_bytes())
    on = triggers(doc)
    assert "push" in on and "pull_request" in on
    (job,) = doc["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["env"]["CI"] == "true"
    uses = [s["uses"] for s in job["steps"] if "uses" in s]
    assert any(u.startswith("actions/checkout@") for u in uses)
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11"
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert any("bash .ci/run" in r for r in runs)
    assert (ROOT / ".ci" / "run").exists()


@pytest.mark.e2e
def test_run_scripts_are_valid_bash() -> None:
    for path in workflow_files():
        for job in load(path.read_bytes())["jobs"].values():
            for step in job.get("steps", []):
                if "run" in step:
                    script = EXPRESSION.sub("placeholder", step["run"])
                    proc = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
                    assert proc.returncode == 0, f"{path.name}: {step.get('name')}: {proc.stderr}"


# --- the reusable workflow, run for real ---------------------------------------------------


def _evaluate(text: str, context: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        expr = match.group(1)
        assert expr in context, f"no value for expression {expr!r} in this test"
        return context[expr]

    return EXPRESSION.sub(one, text)


def _run_state_check(repo: Path, tmp_path: Path, base_ref: str) -> str:
    """Run the state-check job's `run` steps (all but pip install) against `repo`, as GitHub would."""
    shim = tmp_path / "bin"
    shim.mkdir(exist_ok=True)
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from mailstate.api.cli import main; sys.exit(main(sys.argv[1:]))"
    (shim / "mailstate").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(code)} "$@"\n')
    (shim / "mailstate").chmod(0o755)
    summary = tmp_path / "summary.md"
    summary.write_text("")
    context = {"github.base_ref": base_ref, "inputs.mailstate-spec": "unused", "inputs.python-version": "3.11"}
    (job,) = load((WORKFLOWS / "state-check.yml").read_bytes())["jobs"].values()
    for step in job["steps"]:
        if "run" not in step or "pip install" in step["run"]:
            continue
        env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "GITHUB_STEP_SUMMARY": str(summary)}
        env.update({k: _evaluate(str(v), context) for k, v in step.get("env", {}).items()})
        proc = subprocess.run(
            ["bash", "-e", "-c", _evaluate(step["run"], context)], cwd=repo, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, f"step {step.get('name')!r} failed:\n{proc.stdout}\n{proc.stderr}"
    return summary.read_text()


@pytest.mark.e2e
def test_state_check_steps_on_a_pull_request_and_a_push(mail_store: Store, data_dir: DataDir, tmp_path: Path) -> None:
    repo = tmp_path / "state"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "checkout", "-qb", "add-bob"], check=True)
    path = repo / files.domain_path("example.com")
    doc = yaml.safe_load(path.read_text())
    doc["mailboxes"]["bob"] = {
        "id": "20261201-b0b000",
        "password": hash_password("bob's long password", 4),
        "quota_mb": 512,
        "active": True,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    # the admin recompiles rendered/ and commits
    compile_code = "import sys; from mailstate.api.cli import main; sys.exit(main(['compile', sys.argv[1]]))"
    subprocess.run([sys.executable, "-c", compile_code, str(repo)], check=True, cwd=ROOT)
    subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "commit", "-qm", "add bob"], check=True)

    summary = _run_state_check(repo, tmp_path, base_ref="main")  # pull_request: against origin/main
    assert summary.startswith("### mailstate plan: `origin/main (")
    assert "+ bob@example.com (quota 512 MB, id 20261201-b0b000)" in summary
    assert "~ rendered/domains/ex/example.com/passwd: +1 -0 lines" in summary
    assert "$2b$" not in summary

    summary = _run_state_check(repo, tmp_path, base_ref="")  # push: against HEAD~1
    assert summary.startswith("### mailstate plan: `HEAD~1 (") and "+ bob@example.com" in summary

    # a stale rendered/ fails the check
    (repo / "rendered/domains/ex/example.com/passwd").write_text("")
    with pytest.raises(AssertionError, match="mailstate check"):
        _run_state_check(repo, tmp_path, base_ref="main")


@pytest.mark.e2e
def test_state_check_on_the_first_commit(data_dir: DataDir, tmp_path: Path) -> None:
    repo = tmp_path / "state"
    subprocess.run(["git", "clone", "-q", str(data_dir.repo), str(repo)], check=True)
    summary = _run_state_check(repo, tmp_path, base_ref="")
    assert "nothing to compare" in summary
