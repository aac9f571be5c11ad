"""Development servers on this machine, bound to 127.0.0.1.

    infra/local-up [SERVICE...]     start them (default: all), then print the exports that use them
    infra/local-down [SERVICE...]   stop them (default: all)

Services: `postgres` (from the Debian package; the backend of the next two),
`prefect` (a Prefect server on PostgreSQL), `mlflow` (an MLflow tracking
server on PostgreSQL, artifacts proxied to a directory), `ray` (a head node
and a worker node). Everything they keep (databases, artifacts, logs, pids,
`env`) lives in `--dir`, by default `$RLHF_HOME/infra` or `./.rlhf/infra`,
so data survive a local-down and local-up. Ports come from the environment:
RLHF_POSTGRES_PORT (5433), RLHF_PREFECT_PORT (4200), RLHF_MLFLOW_PORT (5000),
RLHF_RAY_PORT (6380); RLHF_RAY_HEAD_CPUS and RLHF_RAY_WORKER_CPUS (1 each).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SERVICES = ("postgres", "prefect", "mlflow", "ray")
NEEDS_POSTGRES = {"prefect", "mlflow"}
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


class Failed(Exception):
    """A service did not start or stop; the message says which and where its log is."""


def port(name: str, default: int) -> int:
    return int(os.environ.get(f"RLHF_{name.upper()}_PORT", default))


class Local:
    def __init__(self, directory: Path):
        self.dir = directory.resolve()
        self.logs = self.dir / "logs"
        self.state_file = self.dir / "state.json"

    # ------------------------------------------------------------ state

    def state(self) -> dict:
        return json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    def save(self, **changes) -> None:
        state = {k: v for k, v in (self.state() | changes).items() if v is not None}
        self.state_file.write_text(json.dumps(state, indent=2))

    def password(self) -> str:
        path = self.dir / "postgres.password"
        if not path.exists():  # created readable by its owner only, never for a moment by others
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
                handle.write(secrets.token_urlsafe(18))
        return path.read_text().strip()

    def exports(self) -> dict[str, str]:
        state = self.state()
        found = {}
        if "postgres" in state:
            found["RLHF_LABELS_URL"] = self.postgres_url("labels", "postgresql+psycopg")
        if "prefect" in state:
            found["PREFECT_API_URL"] = f"http://{HOST}:{state['prefect']['port']}/api"
        if "mlflow" in state:
            found["MLFLOW_TRACKING_URI"] = f"http://{HOST}:{state['mlflow']['port']}"
        if "ray" in state:
            found["RAY_ADDRESS"] = f"{HOST}:{state['ray']['port']}"
            found["RAY_AUTH_MODE"] = "token"  # `ray start` turns token authentication on
        return found

    # ------------------------------------------------------------ postgres

    def postgres_url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://rlhf:{self.password()}@{HOST}:{self.state()['postgres']['port']}/{database}"

    def up_postgres(self) -> None:
        bindir = _postgres_bindir()
        data = self.dir / "postgres"
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # it refuses to run as root
        if not data.exists():
            data.mkdir(mode=0o700)
            with tempfile.NamedTemporaryFile("w", dir=self.dir, delete=False) as pwfile:
                pwfile.write(self.password())
            if as_postgres:
                shutil.chown(data, "postgres", "postgres")
                shutil.chown(pwfile.name, "postgres", "postgres")
                if subprocess.run([*as_postgres, "test", "-w", str(data)]).returncode:
                    data.rmdir()
                    raise Failed(f"postgres: user 'postgres' cannot reach {data}; use a --dir every user can traverse")
            try:
                _run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-U", "rlhf", f"--pwfile={pwfile.name}",
                      "--auth=scram-sha-256", "-E", "UTF8"], self.logs / "postgres-initdb.log")
            finally:
                os.unlink(pwfile.name)
        pg_port = port("postgres", 5433)
        options = f"-p {pg_port} -c listen_addresses={HOST} -c unix_socket_directories=''"
        log = self.logs / "postgres.log"
        if as_postgres:
            log.touch()
            shutil.chown(log, "postgres", "postgres")
        _run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "start"], log)
        self.save(postgres={"port": pg_port, "bindir": str(bindir), "as_postgres": as_postgres})
        self._create_databases("prefect", "mlflow", "labels")

    def _create_databases(self, *names: str) -> None:
        import psycopg

        with psycopg.connect(self.postgres_url("postgres"), autocommit=True) as connection:
            for name in names:
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    connection.execute(f'CREATE DATABASE "{name}"')

    def down_postgres(self) -> None:
        entry = self.state()["postgres"]
        pg_ctl = [*entry["as_postgres"], str(Path(entry["bindir"]) / "pg_ctl")]
        _run([*pg_ctl, "-D", str(self.dir / "postgres"), "-m", "fast", "-w", "stop"], self.logs / "postgres.log")

    # ------------------------------------------------------------ prefect and mlflow

    def up_prefect(self) -> None:
        prefect_port = port("prefect", 4200)
        env = {
            "PREFECT_HOME": str(self.dir / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": self.postgres_url("prefect", "postgresql+asyncpg"),
        }
        command = [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)]
        pid = self._spawn("prefect", command, env)
        self.save(prefect={"port": prefect_port, "pid": pid})
        self._wait_healthy("prefect", f"http://{HOST}:{prefect_port}/api/health", pid)

    def up_mlflow(self) -> None:
        mlflow_port = port("mlflow", 5000)
        command = [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", self.postgres_url("mlflow"),
            "--artifacts-destination", str(self.dir / "mlflow-artifacts"),
            "--host", HOST, "--port", str(mlflow_port), "--workers", "1",
        ]
        pid = self._spawn("mlflow", command, {})
        self.save(mlflow={"port": mlflow_port, "pid": pid})
        self._wait_healthy("mlflow", f"http://{HOST}:{mlflow_port}/health", pid)

    def down_prefect(self) -> None:
        _stop_group(self.state()["prefect"]["pid"])

    def down_mlflow(self) -> None:
        _stop_group(self.state()["mlflow"]["pid"])

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> int:
        with (self.logs / f"{name}.log").open("a") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=os.environ | env, start_new_session=True,
            )
        return process.pid

    def _wait_healthy(self, name: str, url: str, pid: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise Failed(f"{name} exited while starting; see {self.logs / name}.log")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise Failed(f"{name} not healthy at {url} after {timeout:.0f} s; see {self.logs / name}.log")

    # ------------------------------------------------------------ ray

    def up_ray(self) -> None:
        ray_port = port("ray", 6380)
        temp = tempfile.mkdtemp(prefix="rlhf-ray-", dir="/tmp")  # Ray's socket paths must stay under 108 bytes
        common = ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
        env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}  # a joining node sends the token
        self.save(ray={"port": ray_port, "temp_dir": temp})
        head_cpus, worker_cpus = os.environ.get("RLHF_RAY_HEAD_CPUS", "1"), os.environ.get("RLHF_RAY_WORKER_CPUS", "1")
        _run([str(BIN / "ray"), "start", "--head", "--node-ip-address", HOST, "--port", str(ray_port),
              "--num-cpus", head_cpus, *common], self.logs / "ray.log", env)
        _run([str(BIN / "ray"), "start", "--address", f"{HOST}:{ray_port}", "--node-ip-address", HOST,
              "--num-cpus", worker_cpus], self.logs / "ray.log", env)

    def down_ray(self) -> None:
        """Stops this cluster's processes only (`ray stop` would stop every Ray on the machine)."""
        temp = self.state()["ray"]["temp_dir"]
        _stop(_processes_mentioning(temp))
        shutil.rmtree(temp, ignore_errors=True)

    # ------------------------------------------------------------ commands

    def up(self, services: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        wanted = [s for s in SERVICES if s in services or (s == "postgres" and NEEDS_POSTGRES & set(services))]
        for service in wanted:
            if service in self.state():
                _say(f"{service}: already up")
                continue
            _say(f"{service}: starting (log: {self.logs / service}.log)")
            try:
                getattr(self, f"up_{service}")()
            except Failed:
                if service in self.state():  # started in part: stop that part
                    getattr(self, f"down_{service}")()
                    self._forget(service)
                raise
            _say(f"{service}: up")
        self.write_env()

    def down(self, services: list[str]) -> None:
        running = self.state()
        wanted = [s for s in reversed(SERVICES) if s in services and s in running]
        for service in wanted:
            _say(f"{service}: stopping")
            getattr(self, f"down_{service}")()
            self._forget(service)
        self.write_env()

    def _forget(self, service: str) -> None:
        self.save(**{service: None})

    def write_env(self) -> None:
        lines = "".join(f"export {k}={v}\n" for k, v in self.exports().items())
        (self.dir / "env").write_text(lines)
        print(lines, end="")


def _postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise Failed("postgres: no PostgreSQL server found; install it with `apt-get install postgresql`")
    return found[-1].parent


def _run(command: list[str], log: Path, env: dict | None = None) -> None:
    done = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    with log.open("a") as out:
        out.write(done.stdout + done.stderr)
    if done.returncode:
        raise Failed(f"`{' '.join(command[:3])} ...` failed ({done.returncode}); see {log}: {done.stderr.strip()[-500:]}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _stop_group(pid: int) -> None:
    try:
        _stop([-os.getpgid(pid)])
    except ProcessLookupError:
        pass


def _stop(targets: list[int], timeout: float = 30) -> None:
    """SIGTERM the processes (negative: process groups), then SIGKILL what is left after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in targets:
            try:
                os.kill(target, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(_alive(abs(t)) for t in targets):
            time.sleep(0.2)


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


def _say(message: str) -> None:
    print(f"local: {message}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("up", "down", "env"))
    parser.add_argument("services", nargs="*", metavar="SERVICE", help=f"any of {', '.join(SERVICES)} [default: all]")
    home = Path(os.environ.get("RLHF_HOME", ".rlhf"))
    parser.add_argument("--dir", type=Path, default=home / "infra", help="state directory [default: %(default)s]")
    args = parser.parse_intermixed_args()
    if unknown := set(args.services) - set(SERVICES):
        parser.error(f"unknown service {', '.join(sorted(unknown))}; services: {', '.join(SERVICES)}")
    local = Local(args.dir)
    try:
        if args.action == "up":
            local.up(args.services or list(SERVICES))
        elif args.action == "down":
            local.down(args.services or list(SERVICES))
        else:
            local.write_env()
    except Failed as failure:
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
