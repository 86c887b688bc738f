"""The GitHub workflow a state repo uses to validate its pull requests.

`state_repo_workflow()` renders `templates/github/state-repo-workflow.yml.j2` into the one file
a new state repo needs: a workflow that runs on pull requests (and pushes to main) and calls
mailstate's reusable workflow `.github/workflows/state-check.yml`, which runs `mailstate check`,
`mailstate compile --check` and puts `mailstate plan` in the job summary.

`mailstate init --with-workflow` passes the result to `init_data_dir(..., extra_files=...)`
so that the workflow is part of the state repo's first (signed) commit.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import jinja2

from mailstate.state.errors import InvalidInput

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "github"
WORKFLOW_PATH = ".github/workflows/mailstate.yml"
DEFAULT_USES = "OWNER/mailstate/.github/workflows/state-check.yml@main"

# owner/repo/path/to/workflow.yml@ref, or a workflow of the same repo (./.github/workflows/x.yml).
_USES = re.compile(
    r"^(?:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/|\./)\.github/workflows/[A-Za-z0-9_.-]+\.ya?ml(?:@[A-Za-z0-9_./-]+)?$"
)
_BRANCH = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
_SAFE_TEXT = re.compile(r"^[^\x00-\x1f]*$")


@lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


def state_repo_workflow(
    uses: str = DEFAULT_USES,
    *,
    mailstate_spec: str | None = None,
    python_version: str | None = None,
    branch: str = "main",
) -> dict[str, bytes]:
    """`{".github/workflows/mailstate.yml": <bytes>}`: the calling workflow for a state repo.

    `uses` names the reusable workflow (`OWNER/mailstate/.github/workflows/state-check.yml@main`
    by default: replace OWNER); `mailstate_spec` is the pip requirement that installs mailstate
    in CI (the reusable workflow's default when None); `branch` is the state repo's main branch.
    """
    if not _USES.match(uses):
        raise InvalidInput(
            f"{uses!r} does not name a reusable workflow (owner/repo/.github/workflows/file.yml@ref).",
            code="invalid_request",
            field="uses",
        )
    if not _BRANCH.match(branch) or ".." in branch:
        raise InvalidInput(f"{branch!r} is not a branch name.", code="invalid_request", field="branch")
    for name, value in (("mailstate_spec", mailstate_spec), ("python_version", python_version)):
        if value is not None and (not value.strip() or not _SAFE_TEXT.match(value)):
            raise InvalidInput(f"{name} must be one line of text.", code="invalid_request", field=name)
    text = (
        _env()
        .get_template("state-repo-workflow.yml.j2")
        .render(uses=uses, branch=branch, mailstate_spec=mailstate_spec, python_version=python_version)
    )
    return {WORKFLOW_PATH: text.encode("utf-8")}
