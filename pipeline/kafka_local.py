"""A local single-node Kafka (KRaft, broker + controller) for development, demos and tests.

    recur kafka start | stop | status

Jars: Apache Kafka 3.9.2 resolved by Maven from `deploy/kafka/pom.xml` into
<cache_dir>/kafka-3.9.2/. Data, config, log and pid under <var_dir>/kafka/.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

from models.errors import BrokerError
from pipeline.config import Settings

log = logging.getLogger(__name__)

KAFKA_VERSION = "3.9.2"
POM = Path(__file__).resolve().parent.parent / "deploy" / "kafka" / "pom.xml"
HINT = "or point recur at an existing broker: RECUR_BOOTSTRAP=host:port (e.g. after `docker compose up kafka`)"


def _bindable(port: int) -> bool:
    """Whether a listener could bind `port` on 127.0.0.1 now, as the broker's would (with
    SO_REUSEADDR, so that connections of a broker stopped a moment ago do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class LocalKafka:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = settings.kafka_port
        self.controller_port = settings.kafka_port + 1
        self.jars = settings.cache_path / f"kafka-{KAFKA_VERSION}"
        self.home = settings.var_path / "kafka"
        self.data = self.home / "data"
        self.pid_file = self.home / "kafka.pid"
        self.log_file = self.home / "server.log"
        self.admin_password_file = self.home / "admin.password"  # the broker's own SASL user, made at start

    # -- SASL -----------------------------------------------------------------
    @property
    def sasl(self) -> bool:
        """The broker requires SASL/PLAIN: asked for (`--sasl`), or how it was last started."""
        return self.settings.kafka_sasl or self.admin_password_file.exists()

    def admin_credentials(self) -> dict[str, str]:
        """kafka-python options for the broker's own user (a super user: ACLs, health checks)."""
        if not self.sasl:
            return {}
        return {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_plain_username": "admin",
                "sasl_plain_password": self.admin_password_file.read_text().strip()}

    def _users(self) -> dict[str, str]:
        s = self.settings
        users = {s.sasl_username: s.sasl_password}
        for entry in filter(None, s.kafka_sasl_users.split(",")):
            name, password = entry.split(":", 1)
            users[name.strip()] = password
        for name, password in users.items():
            if any(c in name + password for c in '"\\\n ;='):
                raise BrokerError("kafka: SASL user names and passwords may not hold quotes, backslashes, "
                                  "spaces, ';', '=' or line breaks")
        if "admin" in users:
            raise BrokerError("kafka: 'admin' is the local broker's own user; choose another user name")
        return users

    def _sasl_lines(self) -> list[str]:
        import secrets

        if not self.admin_password_file.exists():
            self.admin_password_file.write_text(secrets.token_urlsafe(24) + "\n")
            self.admin_password_file.chmod(0o600)
        admin = self.admin_password_file.read_text().strip()
        users = " ".join(f'user_{name}="{password}"' for name, password in self._users().items())
        return [
            f"listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{self.port}",
            "listener.security.protocol.map=SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=SASL_PLAINTEXT",
            "sasl.enabled.mechanisms=PLAIN",
            "sasl.mechanism.inter.broker.protocol=PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
            f'required username="admin" password="{admin}" user_admin="{admin}" {users};',
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users=User:admin;User:ANONYMOUS",  # ANONYMOUS: the controller listener, on 127.0.0.1 only
            "allow.everyone.if.no.acl.found=true",  # ACLs restrict the resources they name
        ]

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- assembling --------------------------------------------------------
    def ensure_jars(self) -> None:
        """Resolve the broker jars with Maven once; later calls reuse the cache."""
        if (self.jars / ".complete").exists():
            return
        if not shutil.which("java"):
            raise BrokerError(f"kafka: Java (17+) is not installed: install a JDK, {HINT}")
        if not shutil.which("mvn"):
            raise BrokerError(f"kafka: Maven is not installed (needed once to fetch Kafka jars): install it, {HINT}")
        if not POM.exists():
            raise BrokerError(f"kafka: {POM} is missing; run recur from its source checkout, {HINT}")
        log.info("kafka: resolving Apache Kafka %s jars with Maven into %s (first time only)", KAFKA_VERSION, self.jars)
        self.jars.mkdir(parents=True, exist_ok=True)
        cmd = ["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
               "-DincludeScope=runtime", f"-DoutputDirectory={self.jars}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise BrokerError("kafka: Maven could not resolve the Kafka jars: " + " | ".join(tail))
        (self.jars / ".complete").write_text(KAFKA_VERSION + "\n")

    def _java(self, main: str, *args: str, heap: str = "256m") -> list[str]:
        if not shutil.which("java"):
            raise BrokerError(f"kafka: Java (17+) is not installed: install a JDK, {HINT}")
        return ["java", f"-Xmx{heap}", f"-Xms{heap}", "-XX:+UseG1GC", "-Djava.awt.headless=true",
                *self.settings.kafka_jvm_opts.split(),
                f"-Dlog4j.configuration=file:{self.home / 'log4j.properties'}",
                "-cp", f"{self.jars}/*", main, *args]

    def _write_config(self) -> Path:
        self.home.mkdir(parents=True, exist_ok=True)
        props = self.home / "server.properties"
        if self.settings.kafka_sasl:
            listeners = self._sasl_lines()
        else:
            self.admin_password_file.unlink(missing_ok=True)
            listeners = [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        props.touch(mode=0o600)
        props.chmod(0o600)  # with SASL it holds the users' passwords
        props.write_text(
            "\n".join([
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                *listeners,
                "controller.listener.names=CONTROLLER",
                f"log.dirs={self.data.resolve()}",
                f"num.partitions={self.settings.partitions}",
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=4",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                "log.retention.hours=168",
                "",
            ])
        )
        (self.home / "log4j.properties").write_text(
            "\n".join([
                "log4j.rootLogger=WARN, file",
                "log4j.appender.file=org.apache.log4j.FileAppender",
                f"log4j.appender.file.File={self.log_file.resolve()}",
                "log4j.appender.file.layout=org.apache.log4j.PatternLayout",
                "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n",
                "log4j.logger.kafka=WARN",
                "log4j.logger.org.apache.kafka=WARN",
                "",
            ])
        )
        return props

    def _format(self, props: Path) -> None:
        if (self.data / "meta.properties").exists():
            return
        cid = new_cluster_id()
        # `--cluster-id=<id>`, not `-t <id>`: a random id may begin with "-" (1 in 64), which the
        # storage tool's parser would take for an option
        proc = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", f"--cluster-id={cid}", "-c", str(props)),
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise BrokerError("kafka: formatting the log dir failed: " + error_lines(proc.stdout + proc.stderr))

    # -- running -----------------------------------------------------------
    def pid(self) -> int | None:
        """The broker's pid if our pid file names a live java process."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"kafka.Kafka" not in cmdline.read_bytes():
            return None
        return pid

    def _port_open(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def answers(self, timeout: float = 5.0) -> bool:
        """True when the broker answers a metadata request."""
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=int(timeout * 1000),
                                     **self.admin_credentials())
        except Exception:  # kafka-python raises NoBrokersAvailable and friends
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def start(self, timeout: float = 90.0) -> str:
        """Start the broker unless it runs already; wait until it answers. Returns a status line."""
        if self.pid() is not None and self.answers():
            return f"kafka already running at {self.bootstrap} (pid {self.pid()})"
        if self.pid() is None and self._port_open():
            raise BrokerError(f"kafka: port {self.port} is taken by another process; set RECUR_KAFKA_PORT, {HINT}")
        if self.pid() is None and not _bindable(self.controller_port):
            raise BrokerError(f"kafka: port {self.controller_port} (the controller's, RECUR_KAFKA_PORT + 1) is taken "
                              f"by another process; set RECUR_KAFKA_PORT, {HINT}")
        self.ensure_jars()
        props = self._write_config()
        self._format(props)
        out = (self.home / "kafka.out").open("ab")
        proc = subprocess.Popen(
            self._java("kafka.Kafka", str(props), heap=self.settings.kafka_heap),
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self.pid_file.write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(f"kafka: the broker exited with code {proc.returncode}; see {self.log_file}")
            if self._port_open() and self.answers(2.0):
                return f"kafka started at {self.bootstrap} (pid {proc.pid})"
            time.sleep(0.5)
        self.stop()
        raise BrokerError(f"kafka: the broker did not answer within {timeout:.0f}s; see {self.log_file}")

    def stop(self, timeout: float = 30.0) -> str:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return "kafka is not running"
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if _reaped(pid) or self.pid() is None:
                break
            time.sleep(0.2)
        else:
            log.warning("kafka: broker did not stop within %.0fs; killing it", timeout)
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return f"kafka stopped (pid {pid})"

    def status(self) -> str:
        pid = self.pid()
        if pid is not None and self.answers():
            return f"kafka running at {self.bootstrap} (pid {pid})"
        if pid is not None:
            return f"kafka process {pid} is up but does not answer at {self.bootstrap}"
        return "kafka is down"


def new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes, URL-safe base64 without padding (as Kafka's own)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def error_lines(output: str, most: int = 3) -> str:
    """A tool's output -> its error lines (or its last lines), whole, joined by " | "."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line.startswith("log4j:") and not line.strip().startswith(("at ", "..."))]
    errors = [line for line in lines if "error" in line.lower() or "exception" in line.lower()]
    return " | ".join((errors or lines)[-most:]) or "no output"


def _reaped(pid: int) -> bool:
    """True once `pid` has exited (reaping it if it is our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat")
            return stat.exists() and stat.read_text().split()[2] == "Z"
        except ProcessLookupError:
            return True


def start_if_needed(settings: Settings) -> tuple[LocalKafka | None, str]:
    """For commands that need a broker for a while (demo, bench): start the local one unless
    RECUR_BOOTSTRAP names another or it is already running. -> (the broker to stop afterwards,
    or None to leave things as they were; a status line)."""
    if not settings.local:
        return None, f"using the broker at {settings.bootstrap}"
    broker = LocalKafka(settings)
    if broker.pid() is not None:
        return None, broker.status() + " (left running afterwards)"
    started = time.monotonic()
    line = broker.start()
    return broker, f"{line} in {time.monotonic() - started:.1f}s"
