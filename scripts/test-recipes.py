"""Runs the README's recipes with the real tools (run by scripts/test-install).

    python3 scripts/test-recipes.py --pycstore-env VENV --tools BIN --work DIR [NAME...]

Each recipe is the code block after a `<!-- recipe: NAME -->` line of
README.md, run as it is written in a fresh project (requirements.txt and
pyproject.toml asking for requests) with HOME in a fresh directory, then
checked: `python -v -c "import requests"` in the venv it made must load
every module of the venv from a pyc, compiling nothing.

- sh blocks run with bash -e, with PATH holding pycstore, uv and poetry.
- The Dockerfile's RUN commands run as a shell script in order (COPY copies
  from the project, WORKDIR moves into a directory under a fresh root,
  --mount options are dropped: the cache mount's store is the one in HOME,
  kept between the two builds); python and pip are those of VENV, the
  environment the wheel was installed into, standing for the image's Python.
  The build runs twice; the second must compile nothing.
- The GitHub Actions job is parsed as YAML; its run: steps run with bash -e
  in order, actions/checkout copies the project, actions/setup-python is
  VENV, actions/cache restores and saves the path it names under its key
  (or the newest matching restore-keys) in a directory kept between runs.
  The job runs twice on fresh machines; the second must compile nothing.
- The GitHub Actions job with a remote cache (github-actions-remote) runs
  the same way, its `${{ }}` expressions and `if:` conditions evaluated
  (vars, secrets, github.event_name, github.ref, &&, ||, ==, !=) and
  $GITHUB_ENV honoured, on four fresh machines sharing one remote (a
  file:// directory, named by the variable PYCSTORE_REMOTE): a pull request
  from a fork (no secrets), a push to main (the secrets, among them the
  signing key the README's `pycstore keygen` command made, whose public key
  is committed), a pull request adding a requirement (six), a push to
  another branch. Checked: who wrote to the remote (only the push to main,
  with entries the committed key signed), what each run compiled (the later
  ones only six) and what `pycstore stats` counts for the remote.

Exits non-zero when a recipe fails, naming it and showing its output.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

REQUIREMENTS = "requests==2.32.3\n"
PYPROJECT = """\
[project]
name = "app"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["requests==2.32.3"]

[tool.poetry]
package-mode = false

# PyPI through its simple API: the mirror of the test machine serves no
# per-version JSON, which poetry's default PyPI source asks for.
[[tool.poetry.source]]
name = "pypi-simple"
url = "https://pypi.org/simple/"
priority = "primary"
"""


class RecipeFailed(Exception):
    pass


def recipes():
    """{name: (language, text)} of README.md's marked code blocks."""
    found = {}
    lines = (REPO / "README.md").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- recipe: ([\w-]+) -->", line.strip())
        if not m:
            continue
        fence = lines[i + 1]
        if not fence.startswith("```"):
            raise RecipeFailed(f"README.md:{i + 2}: recipe {m[1]} is not followed by a code block")
        body = []
        for body_line in lines[i + 2 :]:
            if body_line.startswith("```"):
                break
            body.append(body_line)
        found[m[1]] = (fence[3:].strip(), "\n".join(body) + "\n")
    return found


def make_project(dest: Path):
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "requirements.txt").write_text(REQUIREMENTS)
    (dest / "pyproject.toml").write_text(PYPROJECT)


def run(cmd, cwd, env, what):
    print(f"test-recipes: [{what}] $ {cmd if isinstance(cmd, str) else ' '.join(map(str, cmd))}", flush=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise RecipeFailed(f"{what}: exit {proc.returncode}")
    return proc.stdout


def check_no_compile(venv: Path, env, what):
    """Importing requests from the venv loads every venv module from a pyc."""
    python = venv / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-v", "-c", "import requests"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise RecipeFailed(f"{what}: import requests failed:\n{proc.stderr[-3000:]}")
    root = str(venv.resolve())
    loaded = re.findall(r"^# code object from '([^']+)'", proc.stderr, re.M)
    mine = [p for p in loaded if os.path.realpath(p).startswith(root) or p.startswith(str(venv))]
    compiled = [p for p in mine if p.endswith(".py")]
    pycs = [p for p in mine if p.endswith(".pyc")]
    if compiled or len(pycs) < 20:
        raise RecipeFailed(
            f"{what}: import compiled {len(compiled)} modules of the venv and loaded {len(pycs)} pycs: "
            + ", ".join(compiled[:10])
        )
    print(f"test-recipes: [{what}] import requests: {len(pycs)} modules from pycs, none compiled", flush=True)


def assert_compiled_nothing(output, what):
    m = re.findall(r"(\d+) compiled, (\d+) failed", output)
    if not m:
        raise RecipeFailed(f"{what}: no link summary in the output")
    compiled = int(m[-1][0])
    if compiled != 0:
        raise RecipeFailed(f"{what}: the second run compiled {compiled} pycs; the store should have had them")


class Env:
    def __init__(self, args, work: Path):
        self.args = args
        self.work = work
        self.bin = work / "bin"
        self.bin.mkdir(parents=True, exist_ok=True)
        for name, src in [
            ("pycstore", Path(args.pycstore_env) / "bin" / "pycstore"),
            ("uv", Path(args.tools) / "uv"),
            ("poetry", Path(args.tools) / "poetry"),
        ]:
            link = self.bin / name
            if not link.exists():
                link.symlink_to(src)
        caches = Path(args.caches)
        self.base = {
            "PATH": f"{self.bin}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_CACHE_DIR": str(caches / "uv"),
            "PIP_CACHE_DIR": str(caches / "pip"),
            "POETRY_CACHE_DIR": str(caches / "poetry"),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        }
        # The machine's way out to the package indexes: proxies, CA bundles,
        # index mirrors.
        for var, value in os.environ.items():
            if re.search(r"proxy|CERT|CA_BUNDLE|SSL|INDEX_URL|FIND_LINKS|NATIVE_TLS|TIMEOUT", var, re.I):
                self.base.setdefault(var, value)

    def fresh_home(self, name):
        home = self.work / name / "home"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        return home

    def env(self, home, image_python=False):
        env = dict(self.base)
        env["HOME"] = str(home)
        if image_python:
            env["PATH"] = f"{Path(self.args.pycstore_env) / 'bin'}:{env['PATH']}"
        return env


def run_sh(e: Env, name, text):
    home = e.fresh_home(name)
    project = e.work / name / "project"
    shutil.rmtree(project, ignore_errors=True)
    make_project(project)
    env = e.env(home)
    run(["bash", "--noprofile", "--norc", "-e", "-x", "-c", text], project, env, name)
    check_no_compile(project / ".venv", env, name)


def dockerfile_steps(text):
    """(instruction, argument) pairs, continuation lines joined."""
    steps, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1].strip() + " "
            continue
        current += line.strip()
        instr, _, arg = current.partition(" ")
        steps.append((instr.upper(), arg.strip()))
        current = ""
    return steps


def run_dockerfile(e: Env, name, text):
    home = e.fresh_home(name)  # /root of the builds: holds the cache mount's store
    context = e.work / name / "context"
    shutil.rmtree(context, ignore_errors=True)
    make_project(context)
    env = e.env(home, image_python=True)
    for build in (1, 2):
        root = e.work / name / f"root{build}"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        cwd = root
        output = ""
        for instr, arg in dockerfile_steps(text):
            if instr in ("FROM", "CMD", "ENTRYPOINT", "EXPOSE", "LABEL"):
                continue
            if instr == "WORKDIR":
                cwd = root / arg.lstrip("/")
                cwd.mkdir(parents=True, exist_ok=True)
            elif instr == "COPY":
                src, dest = arg.split()
                target = cwd / dest
                if src == ".":
                    shutil.copytree(context, target, dirs_exist_ok=True)
                else:
                    shutil.copy(context / src, target)
            elif instr == "RUN":
                command = re.sub(r"^(--[\w-]+=\S+\s+)+", "", arg)
                output += run(["sh", "-e", "-c", command], cwd, env, f"{name} build {build}")
            else:
                raise RecipeFailed(f"{name}: instruction {instr} not emulated")
        check_no_compile(cwd / ".venv", env, f"{name} build {build}")
        if build == 2:
            assert_compiled_nothing(output, f"{name} build 2")


def expand(text, project: Path):
    def one(m):
        expr = m[1].strip()
        if expr == "runner.os":
            return "Linux"
        h = re.fullmatch(r"hashFiles\('([^']+)'\)", expr)
        if h:
            return hashlib.sha256((project / h[1]).read_bytes()).hexdigest()
        raise RecipeFailed(f"github-actions: expression {expr!r} not emulated")

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(text))


def run_github_actions(e: Env, name, text):
    workflow = yaml.safe_load(text)
    (job_name, job), = workflow["jobs"].items()
    cache_root = e.work / name / "actions-cache"
    shutil.rmtree(cache_root, ignore_errors=True)
    cache_root.mkdir(parents=True)
    context = e.work / name / "repo"
    shutil.rmtree(context, ignore_errors=True)
    make_project(context)
    for attempt in (1, 2):
        what = f"{name} run {attempt}"
        home = e.fresh_home(f"{name}-{attempt}")
        workspace = e.work / name / f"workspace{attempt}"
        shutil.rmtree(workspace, ignore_errors=True)
        workspace.mkdir(parents=True)
        env = e.env(home, image_python=True)
        saves = []
        output = ""
        for step in job["steps"]:
            uses = step.get("uses", "")
            if uses.startswith("actions/checkout@"):
                shutil.copytree(context, workspace, dirs_exist_ok=True)
            elif uses.startswith("actions/setup-python@"):
                pass  # the environment's python and pip stand for it
            elif uses.startswith("actions/cache@"):
                w = step["with"]
                path = Path(str(w["path"]).replace("~", str(home), 1))
                key = expand(w["key"], workspace)
                restore = [expand(k, workspace) for k in str(w.get("restore-keys", "")).split() if k]
                hit = cache_root / key
                if not hit.exists():
                    candidates = sorted(
                        (p for p in cache_root.iterdir() if any(p.name.startswith(k) for k in restore)),
                        key=lambda p: p.stat().st_mtime,
                    )
                    hit = candidates[-1] if candidates else None
                if hit is not None:
                    print(f"test-recipes: [{what}] cache restored from key {hit.name}", flush=True)
                    shutil.copytree(hit, path, symlinks=True, dirs_exist_ok=True)
                if hit is None or hit.name != key:
                    saves.append((path, cache_root / key))
            elif "run" in step:
                script = expand(step["run"], workspace)
                output += run(
                    ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
                    workspace,
                    env,
                    f"{what}: {step.get('name', 'run')}",
                )
            else:
                raise RecipeFailed(f"{name}: step {step} not emulated")
        for path, dest in saves:
            if path.exists():
                shutil.copytree(path, dest, symlinks=True)
                os.utime(dest)
                time.sleep(0.01)
        check_no_compile(workspace / ".venv", env, what)
        if attempt == 2:
            assert_compiled_nothing(output, what)


class Expr:
    """GitHub Actions expressions: literals, context paths, ==, !=, !, &&, ||
    and parentheses, with GitHub's truthiness ('' , 0, null and false are
    false) and its && / || returning an operand."""

    TOKEN = re.compile(r"\s*(?:('(?:[^']|'')*')|(==|!=|&&|\|\||!|\(|\))|([A-Za-z_][\w.-]*))")

    def __init__(self, text, context):
        self.tokens, pos = [], 0
        text = text.strip()
        while pos < len(text):
            m = self.TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise RecipeFailed(f"expression {text!r} not emulated (at {text[pos:]!r})")
            self.tokens.append(m.groups())
            pos = m.end()
        self.context, self.i, self.text = context, 0, text

    def value(self):
        v = self.or_()
        if self.i != len(self.tokens):
            raise RecipeFailed(f"expression {self.text!r} not emulated")
        return v

    def peek(self):
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def or_(self):
        v = self.and_()
        while self.peek() == "||":
            self.i += 1
            w = self.and_()
            v = v if truthy(v) else w
        return v

    def and_(self):
        v = self.cmp()
        while self.peek() == "&&":
            self.i += 1
            w = self.cmp()
            v = w if truthy(v) else v
        return v

    def cmp(self):
        v = self.unary()
        while self.peek() in ("==", "!="):
            op = self.peek()
            self.i += 1
            w = self.unary()
            v = (str(v) == str(w)) == (op == "==")
        return v

    def unary(self):
        if self.peek() == "!":
            self.i += 1
            return not truthy(self.unary())
        if self.peek() == "(":
            self.i += 1
            v = self.or_()
            if self.peek() != ")":
                raise RecipeFailed(f"expression {self.text!r}: missing )")
            self.i += 1
            return v
        string, op, name = self.tokens[self.i]
        self.i += 1
        if string is not None:
            return string[1:-1].replace("''", "'")
        if name in ("true", "false"):
            return name == "true"
        value = self.context
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                if name.split(".")[0] in ("secrets", "vars"):
                    return ""  # unset secrets and variables are empty
                raise RecipeFailed(f"expression {self.text!r}: {name} not emulated")
            value = value[part]
        return value


def truthy(v):
    return v not in ("", 0, None, False)


def evaluate(text, context):
    """A `${{ }}`-bearing string with every expression replaced by its value."""

    def one(m):
        v = Expr(m[1], context).value()
        return {True: "true", False: "false"}.get(v, str(v)) if isinstance(v, bool) else str(v)

    return re.sub(r"\$\{\{(.*?)\}\}", one, str(text))


def tree_listing(root: Path):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def signers(entry: bytes):
    """The key names of a remote entry's signatures (its layout is drawn in
    store/src/remote/format.rs)."""
    pos = 18 + 32 + 32 + 8 + 16
    inline = int.from_bytes(entry[pos : pos + 4], "little")
    pos += 4 + inline
    names = []
    for _ in range(entry[pos] if pos < len(entry) else 0):
        n = entry[pos + 1]
        names.append(entry[pos + 2 : pos + 2 + n].decode(errors="replace"))
        pos += 1 + n + 64
    return names


def readme_command(prefix):
    """The README's inline command `PREFIX ...` (the recipe's set-up)."""
    found = re.findall(r"`(" + re.escape(prefix) + r"[^`]*)`", (REPO / "README.md").read_text())
    if not found:
        raise RecipeFailed(f"README.md names no `{prefix}...` command")
    return found[0]


def run_github_actions_remote(e: Env, name, text):
    workflow = yaml.safe_load(text)
    (job_name, job), = workflow["jobs"].items()
    base = e.work / name
    shutil.rmtree(base, ignore_errors=True)
    remote = base / "remote"
    remote.mkdir(parents=True)
    context = base / "repo"
    make_project(context)
    # The one-time set-up the README gives: a key pair in ci/, the public
    # key committed, the secret moved to the secret store.
    keygen = readme_command("pycstore keygen ")
    run(["bash", "-e", "-c", keygen], context, e.env(e.fresh_home(f"{name}-keygen")), f"{name}: {keygen}")
    secret_files = list(context.rglob("*.secret"))
    if len(secret_files) != 1:
        raise RecipeFailed(f"{name}: `{keygen}` made {len(secret_files)} secret keys")
    signing_key = secret_files[0].read_text()
    secret_files[0].unlink()
    public_keys = list(context.rglob("*.pub"))
    secrets = {
        "PYCSTORE_S3_KEY_ID": "unused-by-file-remotes",
        "PYCSTORE_S3_SECRET": "unused-by-file-remotes",
        "PYCSTORE_SIGNING_KEY": signing_key,
    }
    variables = {"PYCSTORE_REMOTE": f"file://{remote}"}
    public = public_keys[0].read_text().strip() if public_keys else ""

    runs = [
        # (what, event, ref, secrets, added requirement, expect)
        ("fork pull request", "pull_request", "refs/pull/1/merge", {}, None, "compile-all"),
        ("push to main", "push", "refs/heads/main", secrets, None, "write"),
        ("pull request", "pull_request", "refs/pull/2/merge", secrets, "six==1.17.0", "one"),
        ("push to a branch", "push", "refs/heads/topic", secrets, None, "none"),
    ]
    for what, event, ref, run_secrets, added, expect in runs:
        label = f"{name}: {what}"
        home = e.fresh_home(f"{name}-{event}-{ref.replace('/', '-')}")
        workspace = base / f"workspace-{ref.replace('/', '-')}"
        shutil.rmtree(workspace, ignore_errors=True)
        workspace.mkdir(parents=True)
        runner_temp = base / f"tmp-{ref.replace('/', '-')}"
        shutil.rmtree(runner_temp, ignore_errors=True)
        runner_temp.mkdir()
        github_env = runner_temp / "github_env"
        github_env.touch()
        ctx = {
            "github": {"event_name": event, "ref": ref},
            "secrets": run_secrets,
            "vars": variables,
            "runner": {"os": "Linux", "temp": str(runner_temp)},
        }
        env = e.env(home, image_python=True)
        env.update({"RUNNER_TEMP": str(runner_temp), "GITHUB_ENV": str(github_env), "CI": "true"})
        for k, v in job.get("env", {}).items():
            env[k] = evaluate(v, ctx)
        before = tree_listing(remote)
        output = ""
        for step in job["steps"]:
            if "if" in step and not truthy(Expr(str(step["if"]), ctx).value()):
                print(f"test-recipes: [{label}] skipped: {step.get('name', step.get('uses'))}", flush=True)
                continue
            uses = step.get("uses", "")
            if uses.startswith("actions/checkout@"):
                shutil.copytree(context, workspace, dirs_exist_ok=True)
                if added:  # the pull request adds a requirement
                    with open(workspace / "requirements.txt", "a") as f:
                        f.write(added + "\n")
            elif uses.startswith("actions/setup-python@"):
                pass
            elif "run" in step:
                step_env = dict(env)
                for k, v in step.get("env", {}).items():
                    step_env[k] = evaluate(v, ctx)
                output += run(
                    ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", evaluate(step["run"], ctx)],
                    workspace,
                    step_env,
                    f"{label}: {step.get('name', 'run')}",
                )
                for line in github_env.read_text().splitlines():
                    k, _, v = line.partition("=")
                    env[k] = v
            else:
                raise RecipeFailed(f"{name}: step {step} not emulated")
        check_no_compile(workspace / ".venv", env, label)
        compiled = [int(c) for c, _ in re.findall(r"(\d+) compiled, (\d+) failed", output)]
        if not compiled:
            raise RecipeFailed(f"{label}: no link summary in the output")
        after = tree_listing(remote)
        stats = json.loads(run([str(e.bin / "pycstore"), "stats", "--json"], workspace, env, f"{label}: stats"))
        counters = stats.get("remotes", {})
        uploads = sum(r.get("uploads", 0) for r in counters.values())
        hits = sum(r.get("hits", 0) for r in counters.values())
        rejected = sum(r.get("rejected", 0) for r in counters.values())
        print(
            f"test-recipes: [{label}] compiled {compiled[-1]}; remote: {len(before)} -> {len(after)} files, "
            f"{hits} hits, {uploads} uploads, {rejected} rejected",
            flush=True,
        )
        if expect == "compile-all":
            if compiled[-1] == 0 or after != before or counters:
                raise RecipeFailed(f"{label}: expected a run without the remote that compiles")
        elif expect == "write":
            if compiled[-1] == 0 or uploads == 0 or len(after) <= len(before):
                raise RecipeFailed(f"{label}: expected a run that compiles and uploads")
            if "0 uploaded" not in output or "already there" not in output:
                raise RecipeFailed(f"{label}: push found pycs the remote lacked after link uploaded")
            entries = [p for p in remote.rglob("*") if p.is_file() and "/entries/" in str(p)]
            key_name = public.split(":", 1)[0]
            if not entries or not all(key_name in signers(p.read_bytes()) for p in entries):
                raise RecipeFailed(f"{label}: entries not signed by the committed key {key_name!r}")
        else:
            want = 1 if expect == "one" else 0  # six is one module
            if compiled[-1] != want:
                raise RecipeFailed(f"{label}: compiled {compiled[-1]}, expected {want}")
            if after != before or uploads != 0:
                raise RecipeFailed(f"{label}: a read-only run wrote to the remote")
            if hits == 0 or rejected != 0:
                raise RecipeFailed(f"{label}: expected signed hits from the remote")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pycstore-env", required=True, help="venv the wheel is installed in")
    parser.add_argument("--tools", required=True, help="bin directory with uv and poetry")
    parser.add_argument("--work", required=True)
    parser.add_argument("--caches", required=True, help="uv/pip/poetry download caches")
    parser.add_argument("names", nargs="*")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    e = Env(args, work)
    found = recipes()
    expected = {"uv-pip", "uv-sync", "pip", "poetry", "dockerfile", "github-actions", "github-actions-remote"}
    missing = expected - set(found)
    if missing:
        print(f"test-recipes: README.md lacks recipes: {sorted(missing)}", file=sys.stderr)
        return 1
    failed = []
    for name, (lang, text) in found.items():
        if args.names and name not in args.names:
            continue
        start = time.monotonic()
        try:
            if lang == "sh":
                run_sh(e, name, text)
            elif lang == "dockerfile":
                run_dockerfile(e, name, text)
            elif lang == "yaml" and name == "github-actions-remote":
                run_github_actions_remote(e, name, text)
            elif lang == "yaml":
                run_github_actions(e, name, text)
            else:
                raise RecipeFailed(f"{name}: no runner for ```{lang}")
            print(f"test-recipes: PASS {name} ({time.monotonic() - start:.1f} s)", flush=True)
        except RecipeFailed as err:
            print(f"test-recipes: FAIL {err}", flush=True)
            failed.append(name)
    if failed:
        print(f"test-recipes: failed: {' '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
