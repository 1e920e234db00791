"""Try a worker by hand: run one function of a project directory as a job.

    python -m fluster_worker.try_job --worker http://127.0.0.1:8080 DIR module:function

Zips DIR (the project: pyproject.toml, its sources) into a bundle the worker
can read (``file://``: the worker runs on this machine), builds the entry point
as the Fluster clients do (``module:function``, resolved inside the container
from the bundle), submits it with the official Connect client, prints the job's
log lines as they come (stdout here on stdout; stderr, build and error lines on
stderr), then the result or the error. Exit status: 0 when the job SUCCEEDED,
1 when it ended otherwise, 2 when it could not be submitted or followed, 130
after Ctrl-C (the job is killed first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from fluster_worker.client.bundle import zip_project
from fluster_worker.client.entrypoint import parse_target, serialized_entrypoint
from fluster_worker.client.follow import Follower, show_result
from fluster_worker.client.rpc import MissingClient, WorkerRpc, describe_error
from fluster_worker.web.rpc import cluster_pb2 as pb

EXIT_OK, EXIT_JOB_FAILED, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fluster_worker.try_job",
        description="Run module:function of a project directory as a job on a worker and follow it.",
    )
    parser.add_argument("project", type=Path, help="the project directory (zipped as the job's bundle)")
    parser.add_argument("target", help="what to run, MODULE:FUNCTION (e.g. mypkg.train:main)")
    parser.add_argument("--worker", default=os.environ.get("FLUSTER_WORKER_URL", "http://127.0.0.1:8080"),
                        help="the worker's URL [default: $FLUSTER_WORKER_URL or http://127.0.0.1:8080]")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("FLUSTER_WORKER_TOKEN_FILE") or None,
                        help="file with the worker's token (--auth-token-file) [default: $FLUSTER_WORKER_TOKEN_FILE]")
    parser.add_argument("--ca-cert", type=Path, default=None,
                        help="PEM certificate an https:// worker is checked against, besides the system's CAs")
    parser.add_argument("--job-id", default="", help="the job id [default: try-<project>-<random>]")
    parser.add_argument("--args", default="[]", help="positional arguments, a JSON list")
    parser.add_argument("--kwargs", default="{}", help="keyword arguments, a JSON object")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable")
    parser.add_argument("--port", action="append", default=[], metavar="NAME", help="a named port to allocate")
    parser.add_argument("--cpu", type=int, default=0, help="CPU cores limit")
    parser.add_argument("--memory", default="", help='memory limit, e.g. "1g"')
    parser.add_argument("--timeout", type=int, default=0, help="job timeout in seconds (0: none)")
    parser.add_argument("--bundle-dir", type=Path, default=None,
                        help="where the bundle zip is written (the worker must read it) [default: a temp dir]")
    return parser.parse_args(list(argv))


def job_request(args: argparse.Namespace, bundle: Path) -> pb.RunJobRequest:
    call_args = json.loads(args.args)
    call_kwargs = json.loads(args.kwargs)
    if not isinstance(call_args, list) or not isinstance(call_kwargs, dict):
        raise ValueError("--args must be a JSON list and --kwargs a JSON object")
    env: dict[str, str] = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {item[:60]!r} is not NAME=VALUE")
        env[name] = value
    job_id = args.job_id or default_job_id(args.project)
    return pb.RunJobRequest(
        job_id=job_id,
        serialized_entrypoint=serialized_entrypoint(args.target, tuple(call_args), call_kwargs),
        environment=pb.EnvironmentConfig(workspace=str(args.project.resolve()), env_vars=env),
        bundle_gcs_path=f"file://{bundle}",
        resources=pb.ResourceSpec(cpu=args.cpu, memory=args.memory),
        timeout_seconds=args.timeout,
        ports=list(args.port),
    )


def default_job_id(project: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", project.resolve().name).strip("-._")[:40] or "job"
    return f"try-{name}-{uuid.uuid4().hex[:6]}"


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout, err: IO[str] = sys.stderr) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        parse_target(args.target)
        if not args.project.is_dir():
            raise ValueError(f"{args.project} is not a directory")
        token = args.token_file.read_text().strip() if args.token_file is not None else None
        ca_pem = args.ca_cert.read_bytes() if args.ca_cert is not None else None
        rpc = WorkerRpc(args.worker, token=token, ca_pem=ca_pem)
    except (ValueError, OSError, MissingClient) as e:
        err.write(f"try_job: {e}\n")
        return EXIT_ERROR
    workdir = Path(tempfile.mkdtemp(prefix="fluster-try-", dir=args.bundle_dir))
    try:
        return _run(args, rpc, workdir, out, err)
    finally:
        rpc.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _run(args: argparse.Namespace, rpc: WorkerRpc, workdir: Path, out: IO[str], err: IO[str]) -> int:
    # Readable by a worker that runs as another user.
    workdir.chmod(0o755)
    bundle = workdir / "bundle.zip"
    try:
        files = zip_project(args.project, bundle)
        bundle.chmod(0o644)
        request = job_request(args, bundle)
    except (ValueError, OSError) as e:
        err.write(f"try_job: {e}\n")
        return EXIT_ERROR
    job_id = request.job_id
    try:
        accepted = rpc.run_job(request)
    except Exception as e:
        err.write(f"try_job: {args.worker} refused the job: {describe_error(e)}\n")
        return EXIT_ERROR
    err.write(f"try_job: job {accepted.job_id or job_id} ({files} files, {args.target}) submitted to {args.worker}\n")
    follower = Follower(rpc, job_id, out, err)
    try:
        status = follower.until_done()
    except KeyboardInterrupt:
        return _interrupted(rpc, follower, job_id, err)
    except Exception as e:
        err.write(f"try_job: lost track of job {job_id}: {describe_error(e)}\n")
        return EXIT_ERROR
    return report(status, out, err)


def _interrupted(rpc: WorkerRpc, follower: Follower, job_id: str, err: IO[str]) -> int:
    err.write(f"try_job: interrupted: killing job {job_id} (Ctrl-C again to leave it running)\n")
    try:
        rpc.kill(job_id)
        report(follower.until_done(), sys.stdout, err)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        err.write(f"try_job: {describe_error(e)}\n")
    return EXIT_INTERRUPTED


def report(status: pb.JobStatus, out: IO[str], err: IO[str]) -> int:
    state = pb.JobState.Name(status.state).removeprefix("JOB_STATE_")
    if status.state == pb.JOB_STATE_SUCCEEDED:
        out.write(f"result: {show_result(status.serialized_result)}\n")
        err.write(f"try_job: job {status.job_id} {state}\n")
        return EXIT_OK
    err.write(f"try_job: job {status.job_id} {state}: {status.error or 'no error given'}\n")
    return EXIT_JOB_FAILED


def _main() -> Any:
    sys.exit(main())


if __name__ == "__main__":
    _main()
