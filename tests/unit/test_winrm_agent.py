"""WinRmAgent against pywinrm's real Protocol/Transport and requests' real Session.

Only the socket is replaced: a requests transport adapter (mounted on the Session that
pywinrm's Transport.build_session creates) answers with WS-Management SOAP in the
shapes [MS-WSMV] documents (3.1.4.5.2 Create -> wst:ResourceCreated with the ShellId
selector; 3.1.4.11 Command -> rsp:CommandResponse; 3.1.4.14 Receive ->
rsp:ReceiveResponse with base64 rsp:Stream and rsp:CommandState; Signal; Delete; and
the wsmanfault Code 2150858793 operation-timeout fault). The "guest" behind it decodes
each -EncodedCommand, reads the parameters back with the PowerShell grammar and
emulates our own fixed templates in Python.

What this proves: our side of the protocol, chunking, hashing, deadlines, streaming,
credentials and redaction, through unmodified pywinrm. What it does not: that a real
Windows WinRM service and real PowerShell behave like the emulation (no Windows here).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
import requests.adapters
import winrm.transport

from lab.agent.powershell import JSON_MARKER, decode_encoded_command, script_params
from lab.agent.winrm import (
    ENV_PASSWORD,
    ENV_USER,
    REDACTOR,
    WinRmAgent,
    WinRmConfig,
    WinRmCredentials,
    clean_clixml,
    install_redaction,
)
from lab.errors import AgentError, ConfigError, DeadlineExceeded

PASSWORD = "S3cr3t'\"<&>pässwörd$(x)"
USER = "rebalab"

NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://schemas.xmlsoap.org/ws/2004/08/addressing",
    "w": "http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd",
    "rsp": "http://schemas.microsoft.com/wbem/wsman/1/windows/shell",
}
SHELL_NS = NS["rsp"]
ENVELOPE_OPEN = (
    '<s:Envelope xml:lang="en-US" xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:a="http://schemas.xmlsoap.org/ws/2004/08/addressing" '
    'xmlns:x="http://schemas.xmlsoap.org/ws/2004/09/transfer" '
    'xmlns:w="http://schemas.dmtf.org/wbem/wsman/1/wsman.xsd" '
    'xmlns:rsp="http://schemas.microsoft.com/wbem/wsman/1/windows/shell" '
    'xmlns:p="http://schemas.microsoft.com/wbem/wsman/1/wsman.xsd">'
)


def envelope(action: str, relates_to: str, body: str) -> str:
    return (f'<?xml version="1.0" encoding="utf-8"?>{ENVELOPE_OPEN}<s:Header>'
            f"<a:Action>{action}</a:Action><a:MessageID>uuid:{uuid.uuid4()}</a:MessageID>"
            "<a:To>http://schemas.xmlsoap.org/ws/2004/08/addressing/role/anonymous</a:To>"
            f"<a:RelatesTo>{relates_to}</a:RelatesTo></s:Header><s:Body>{body}</s:Body></s:Envelope>")


def timeout_fault(relates_to: str) -> str:
    return envelope(
        "http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", relates_to,
        '<s:Fault><s:Code><s:Value>s:Receiver</s:Value><s:Subcode><s:Value>w:TimedOut</s:Value>'
        '</s:Subcode></s:Code><s:Reason><s:Text xml:lang="en-US">The WS-Management service cannot '
        "complete the operation within the time specified in OperationTimeout.</s:Text></s:Reason>"
        '<s:Detail><f:WSManFault xmlns:f="http://schemas.microsoft.com/wbem/wsman/1/wsmanfault" '
        'Code="2150858793" Machine="guest"><f:Message>The WS-Management service cannot complete the '
        "operation.</f:Message></f:WSManFault></s:Detail></s:Fault>")


class Reply:
    """What the fake guest answers for one command."""

    def __init__(self, chunks: list[tuple[str, bytes]] | None = None, exit_code: int = 0,
                 timeouts_first: int = 0, never_ends: bool = False) -> None:
        self.chunks = list(chunks or [])
        self.exit_code = exit_code
        self.timeouts_first = timeouts_first
        self.never_ends = never_ends


class FakeGuest:
    """A Windows guest as far as our templates are concerned: a file system in a dict."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.scripts: list[str] = []
        self.custom: list[tuple[Callable[[str], bool], Callable[[str], Reply]]] = []
        self.corrupt_chunks = False

    @staticmethod
    def structured(objs: list[Any]) -> bytes:
        text = json.dumps(objs, separators=(",", ":"))
        return (JSON_MARKER + base64.b64encode(text.encode("utf-8")).decode("ascii") + "\r\n").encode()

    def execute(self, script: str) -> Reply:
        self.scripts.append(script)
        p = script_params(script)
        for match, handler in self.custom:
            if match(script):
                return handler(script)
        if "[Environment]::OSVersion" in script:
            return Reply([("stdout", b"10.0.22621.0\r\n")])
        if "WriteAllBytes($p.Part" in script:
            self.files[p["Part"]] = b""
            return Reply()
        if "FromBase64String($p.Data)" in script:
            data = base64.b64decode(p["Data"])
            if self.corrupt_chunks:
                data = data[:-1]
            self.files[p["Part"]] += data
            return Reply()
        if "TransformBlock" in script:
            path = p["Path"]
            if path not in self.files:
                return Reply([("stderr", b"file not found\r\n")], exit_code=1)
            data = self.files[path]
            return Reply([("stdout", self.structured([{"Length": len(data),
                                                       "Sha256": hashlib.sha256(data).hexdigest().upper()}]))])
        if "Move-Item -LiteralPath $p.Part" in script:
            self.files[p["Path"]] = self.files.pop(p["Part"])
            return Reply()
        if "[IO.SeekOrigin]::Begin" in script and "ToBase64String($buf, 0, $n)" in script:
            data = self.files[p["Path"]]
            off, count = _int_param(script, "Offset"), _int_param(script, "Count")
            return Reply([("stdout", base64.b64encode(data[off:off + count]) + b"\r\n")])
        return Reply([("stderr", b"unknown script\r\n")], exit_code=99)


def _int_param(script: str, name: str) -> int:
    for line in script.splitlines():
        if line.strip().startswith(f"{name} = "):
            return int(line.split("=", 1)[1])
    raise KeyError(name)


class FakeWsman(requests.adapters.BaseAdapter):
    """The HTTP boundary: parses pywinrm's SOAP requests, answers like WinRM."""

    def __init__(self, guest: FakeGuest) -> None:
        super().__init__()
        self.guest = guest
        self.requests: list[dict[str, Any]] = []
        self.commands: dict[str, dict[str, Any]] = {}
        self.shells: set[str] = set()
        self.signals: list[str] = []
        self.options: list[dict[str, str]] = []

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        body = request.body if isinstance(request.body, bytes) else (request.body or "").encode()
        self.requests.append({"url": request.url, "headers": dict(request.headers), "verify": verify,
                              "body": body})
        status, text = self.dispatch(ET.fromstring(body))
        resp = requests.Response()
        resp.status_code = status
        resp._content = text.encode("utf-8")
        resp.headers["Content-Type"] = "application/soap+xml;charset=UTF-8"
        resp.url = request.url or ""
        resp.request = request
        resp.reason = "OK" if status == 200 else "Internal Server Error"
        return resp

    def close(self) -> None:
        pass

    def dispatch(self, root: ET.Element) -> tuple[int, str]:
        action = root.findtext("s:Header/a:Action", namespaces=NS) or ""
        msg_id = root.findtext("s:Header/a:MessageID", namespaces=NS) or ""
        shell_id = root.findtext("s:Header/w:SelectorSet/w:Selector", namespaces=NS)
        opts = {o.get("Name", ""): o.text or "" for o in root.findall("s:Header/w:OptionSet/w:Option", NS)}
        if opts:
            self.options.append(opts)
        name = action.rsplit("/", 1)[-1]
        if name == "Create":
            sid = str(uuid.uuid4()).upper()
            self.shells.add(sid)
            return 200, envelope(
                "http://schemas.xmlsoap.org/ws/2004/09/transfer/CreateResponse", msg_id,
                "<x:ResourceCreated><a:Address>https://127.0.0.1:5986/wsman</a:Address><a:ReferenceParameters>"
                "<w:ResourceURI>http://schemas.microsoft.com/wbem/wsman/1/windows/shell/cmd</w:ResourceURI>"
                f'<w:SelectorSet><w:Selector Name="ShellId">{sid}</w:Selector></w:SelectorSet>'
                f"</a:ReferenceParameters></x:ResourceCreated><rsp:Shell><rsp:ShellId>{sid}</rsp:ShellId>"
                "<rsp:InputStreams>stdin</rsp:InputStreams><rsp:OutputStreams>stdout stderr</rsp:OutputStreams>"
                "</rsp:Shell>")
        if shell_id not in self.shells:
            return 500, envelope("http://schemas.dmtf.org/wbem/wsman/1/wsman/fault", msg_id,
                                 "<s:Fault><s:Code><s:Value>s:Sender</s:Value></s:Code><s:Reason>"
                                 '<s:Text xml:lang="en-US">unknown shell</s:Text></s:Reason></s:Fault>')
        if name == "Command":
            cmdline = root.findtext("s:Body/rsp:CommandLine/rsp:Command", namespaces=NS) or ""
            reply = self.guest.execute(decode_encoded_command(cmdline))
            cid = str(uuid.uuid4()).upper()
            self.commands[cid] = {"reply": reply, "cmdline": cmdline}
            return 200, envelope("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/CommandResponse",
                                 msg_id, f"<rsp:CommandResponse><rsp:CommandId>{cid}</rsp:CommandId>"
                                 "</rsp:CommandResponse>")
        if name == "Receive":
            stream_el = root.find("s:Body/rsp:Receive/rsp:DesiredStream", NS)
            cid = stream_el.get("CommandId") if stream_el is not None else ""
            reply = self.commands[cid]["reply"]
            if reply.timeouts_first > 0:
                reply.timeouts_first -= 1
                return 500, timeout_fault(msg_id)
            parts = []
            if reply.chunks:
                stream, data = reply.chunks.pop(0)
                parts.append(f'<rsp:Stream Name="{stream}" CommandId="{cid}">'
                             f"{base64.b64encode(data).decode()}</rsp:Stream>")
            if reply.chunks or reply.never_ends:
                state = (f'<rsp:CommandState CommandId="{cid}" State="http://schemas.microsoft.com/wbem/'
                         'wsman/1/windows/shell/CommandState/Running"/>')
            else:
                parts.append(f'<rsp:Stream Name="stdout" CommandId="{cid}" End="true"/>'
                             f'<rsp:Stream Name="stderr" CommandId="{cid}" End="true"/>')
                state = (f'<rsp:CommandState CommandId="{cid}" State="http://schemas.microsoft.com/wbem/'
                         f'wsman/1/windows/shell/CommandState/Done"><rsp:ExitCode>{reply.exit_code}'
                         "</rsp:ExitCode></rsp:CommandState>")
            return 200, envelope("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/ReceiveResponse",
                                 msg_id, "<rsp:ReceiveResponse>" + "".join(parts) + state + "</rsp:ReceiveResponse>")
        if name == "Signal":
            sig = root.find("s:Body/rsp:Signal", NS)
            self.signals.append(sig.findtext("rsp:Code", namespaces=NS) if sig is not None else "")
            return 200, envelope("http://schemas.microsoft.com/wbem/wsman/1/windows/shell/SignalResponse",
                                 msg_id, "<rsp:SignalResponse/>")
        if name == "Delete":
            self.shells.discard(shell_id or "")
            return 200, envelope("http://schemas.xmlsoap.org/ws/2004/09/transfer/DeleteResponse", msg_id, "")
        return 500, envelope("fault", msg_id, "")


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeWsman:
    guest = FakeGuest()
    adapter = FakeWsman(guest)
    original = winrm.transport.Transport.build_session

    def build_session(self: winrm.transport.Transport) -> requests.Session:
        session = original(self)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        return session

    monkeypatch.setattr(winrm.transport.Transport, "build_session", build_session)
    return adapter


def make_agent(**cfg: Any) -> WinRmAgent:
    conf = {"host": "127.0.0.1", "port": 5986, "transport": "basic", "operation_timeout": 2, "read_timeout": 5}
    conf.update(cfg)
    return WinRmAgent(WinRmConfig.from_mapping(conf), WinRmCredentials(USER, PASSWORD, source="test"))


# ------------------------------------------------------------------ running

def test_run_uses_encoded_powershell_without_cmd_exe(fake: FakeWsman) -> None:
    fake.guest.custom.append((lambda s: "Write-Output $p.Msg" in s,
                              lambda s: Reply([("stdout", (script_params(s)["Msg"] + "\r\n").encode())])))
    agent = make_agent()
    from lab.agent.powershell import build_script

    res = agent.run(build_script("Write-Output $p.Msg", {"Msg": "hi ' $(x) \u2019"}))
    assert res.ok and res.stdout == "hi ' $(x) \u2019\r\n"
    assert fake.requests[0]["url"] == "https://127.0.0.1:5986/wsman"
    cmd_opts = [o for o in fake.options if "WINRS_SKIP_CMD_SHELL" in o]
    assert cmd_opts and cmd_opts[0]["WINRS_SKIP_CMD_SHELL"] == "TRUE"
    create_opts = [o for o in fake.options if "WINRS_CODEPAGE" in o]
    assert create_opts[0]["WINRS_CODEPAGE"] == "65001"
    # the shell is reused: one Create for two commands
    agent.run(build_script("Write-Output $p.Msg", {"Msg": "again"}))
    creates = [r for r in fake.requests if b"transfer/Create<" in r["body"]]
    assert len(creates) == 1
    agent.close()
    assert not fake.shells  # Delete sent


def test_basic_auth_header_and_certificate_validation_defaults(fake: FakeWsman) -> None:
    agent = make_agent()
    agent.run("Write-Output 1")
    req = fake.requests[0]
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode("latin-1", "replace")).decode()
    assert req["headers"]["Authorization"] in (f"Basic {token}",
                                               "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    assert req["verify"] is True


def test_ca_bundle_and_explicit_ignore(fake: FakeWsman, tmp_path: Path) -> None:
    ca = tmp_path / "guest.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    make_agent(ca_bundle=str(ca)).run("Write-Output 1")
    assert fake.requests[-1]["verify"] == str(ca)
    make_agent(server_cert_validation="ignore").run("Write-Output 1")
    assert fake.requests[-1]["verify"] is False


def test_exit_status_and_clixml_stderr(fake: FakeWsman) -> None:
    clixml = ('#< CLIXML\r\n<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
              '<S S="Error">Boom: it failed_x000D__x000A_</S><S S="Error">second line_x000D__x000A_</S></Objs>')
    fake.guest.custom.append((lambda s: "throw" in s, lambda s: Reply([("stderr", clixml.encode())], exit_code=1)))
    res = make_agent().run("throw 'x'")
    assert res.exit_status == 1
    assert res.stderr == "Boom: it failed\r\nsecond line"
    with pytest.raises(AgentError, match="status 1"):
        res.check()


def test_operation_timeouts_are_retried(fake: FakeWsman) -> None:
    fake.guest.custom.append((lambda s: "slow" in s, lambda s: Reply([("stdout", b"done\r\n")], timeouts_first=3)))
    assert make_agent().run("slow").stdout == "done\r\n"


def test_deadline_terminates_the_command(fake: FakeWsman) -> None:
    fake.guest.custom.append((lambda s: "forever" in s,
                              lambda s: Reply([("stdout", b"partial output\r\n")], never_ends=True)))
    agent = make_agent()
    with pytest.raises(DeadlineExceeded) as exc:
        agent.run("forever", timeout=0.3)
    assert "forever" in str(exc.value) and "partial output" in str(exc.value)
    assert fake.signals == ["http://schemas.microsoft.com/wbem/wsman/1/windows/shell/signal/terminate"]


def test_run_json(fake: FakeWsman) -> None:
    fake.guest.custom.append((lambda s: "Get-Thing" in s,
                              lambda s: Reply([("stdout", FakeGuest.structured([{"Name": "Grüße"}]))])))
    assert make_agent().run_json("Get-Thing") == [{"Name": "Grüße"}]


def test_stream_yields_lines_across_chunks(fake: FakeWsman) -> None:
    euro = "€".encode()
    chunks = [("stdout", b"first li"), ("stdout", b"ne\r\nsecond " + euro[:1]),
              ("stdout", euro[1:] + b"\r\nthird"), ("stdout", b" and last")]
    fake.guest.custom.append((lambda s: "Watch" in s, lambda s: Reply(chunks, timeouts_first=1)))
    lines = list(make_agent().stream("Watch"))
    assert lines == ["first line", "second €", "third and last"]


def test_stream_failure_raises_after_lines(fake: FakeWsman) -> None:
    fake.guest.custom.append((lambda s: "Bad" in s,
                              lambda s: Reply([("stdout", b"a\r\n"), ("stderr", b"went wrong\r\n")], exit_code=3)))
    got: list[str] = []
    with pytest.raises(AgentError, match="status 3"):
        for line in make_agent().stream("Bad"):
            got.append(line)
    assert got == ["a"]


# ------------------------------------------------------------------ files

def test_put_and_get_round_trip_with_sha256(fake: FakeWsman, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    src = tmp_path / "driver.sys"
    src.write_bytes(data)
    agent = make_agent()
    agent.put(src, "C:\\rebalab\\driver it's\\driver.sys")
    assert fake.guest.files["C:\\rebalab\\driver it's\\driver.sys"] == data
    assert not any(k.endswith(".rebalab-part") for k in fake.guest.files)
    # every command stayed inside the command-line limit
    for r in fake.requests:
        cmd = ET.fromstring(r["body"]).findtext("s:Body/rsp:CommandLine/rsp:Command", namespaces=NS)
        if cmd:
            assert len(cmd) <= agent.config.command_limit
    dst = tmp_path / "back.sys"
    agent.get("C:\\rebalab\\driver it's\\driver.sys", dst, chunk=7000)
    assert dst.read_bytes() == data


def test_put_detects_corruption_and_leaves_no_file(fake: FakeWsman, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 5000)
    fake.guest.corrupt_chunks = True
    with pytest.raises(AgentError, match="verification"):
        make_agent().put(src, "C:\\t\\f.bin")
    assert "C:\\t\\f.bin" not in fake.guest.files


def test_get_detects_corruption(fake: FakeWsman, tmp_path: Path) -> None:
    fake.guest.files["C:\\x.dmp"] = b"abcdef" * 1000
    real = fake.guest.execute

    def lying(script: str) -> Reply:
        reply = real(script)
        if "TransformBlock" in script:
            reply.chunks = [("stdout", FakeGuest.structured([{"Length": 6000, "Sha256": "00" * 32}]))]
        return reply

    fake.guest.execute = lying  # type: ignore[method-assign]
    dst = tmp_path / "x.dmp"
    with pytest.raises(AgentError, match="verification"):
        make_agent().get("C:\\x.dmp", dst)
    assert not dst.exists() and not (tmp_path / "x.dmp.part").exists()


def test_wait_ready(fake: FakeWsman) -> None:
    make_agent().wait_ready(5)


# ------------------------------------------------------------------ credentials and secrets

def test_credentials_from_environment() -> None:
    c = WinRmCredentials.from_env({ENV_USER: "u", ENV_PASSWORD: "pw-env"})
    assert c is not None and c.username == "u" and c.password == "pw-env"
    assert WinRmCredentials.from_env({}) is None
    with pytest.raises(ConfigError, match=ENV_PASSWORD):
        WinRmCredentials.from_env({ENV_USER: "u"})


def test_credentials_file_must_be_0600(tmp_path: Path) -> None:
    f = tmp_path / "winrm.json"
    f.write_text(json.dumps({"username": "u", "password": "pw-file"}))
    os.chmod(f, 0o644)
    with pytest.raises(ConfigError, match="0644.*0600"):
        WinRmCredentials.from_file(f)
    os.chmod(f, 0o600)
    c = WinRmCredentials.from_file(f)
    assert c.password == "pw-file"
    f.write_text("not json pw-file-2")
    os.chmod(f, 0o600)
    with pytest.raises(ConfigError) as exc:
        WinRmCredentials.from_file(f)
    assert "pw-file-2" not in str(exc.value)
    with pytest.raises(ConfigError, match="not found|cannot read"):
        WinRmCredentials.from_file(tmp_path / "missing.json")


def test_resolve_prefers_the_configured_file_and_explains_absence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=ENV_USER):
        WinRmCredentials.resolve(None, environ={})


def test_config_refuses_passwords_and_plain_http_basic() -> None:
    with pytest.raises(ConfigError, match="not accepted"):
        WinRmConfig.from_mapping({"host": "127.0.0.1", "password": "x"})
    with pytest.raises(ConfigError, match="clear"):
        WinRmConfig.from_mapping({"host": "127.0.0.1", "scheme": "http", "transport": "basic"})
    with pytest.raises(ConfigError, match="winrm.port"):
        WinRmConfig.from_mapping({"host": "127.0.0.1", "port": 0})
    cfg = WinRmConfig.from_mapping({"host": "127.0.0.1"})
    assert cfg.endpoint == "https://127.0.0.1:5986/wsman"
    assert cfg.server_cert_validation == "validate" and cfg.transport == "ntlm"


def test_password_never_in_repr() -> None:
    agent = make_agent()
    for text in (repr(agent), str(agent), repr(agent._credentials), str(agent._credentials)):
        assert PASSWORD not in text
    with pytest.raises(TypeError):
        __import__("pickle").dumps(agent._credentials)


def test_password_never_in_logs(fake: FakeWsman, tmp_path: Path) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    install_redaction(handler)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        agent = make_agent(server_cert_validation="ignore")
        agent.run("Write-Output 1")
        src = tmp_path / "a.bin"
        src.write_bytes(b"data")
        agent.put(src, "C:\\a.bin")
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        logging.getLogger("somebody.careless").warning("connecting with %s / %s", PASSWORD, token)
        try:
            raise RuntimeError(f"failed with password {PASSWORD}")
        except RuntimeError:
            logging.getLogger("lab").exception("oops %s", "x")
        agent.close()
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    out = stream.getvalue()
    assert "***" in out and "oops" in out and "validation is OFF" in out
    assert PASSWORD not in out
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in out
    assert REDACTOR.redact(f"x{PASSWORD}y") == "x***y"


def test_rejected_credentials_name_the_user_not_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    class Deny(requests.adapters.BaseAdapter):
        def send(self, request: requests.PreparedRequest, **kw: Any) -> requests.Response:
            r = requests.Response()
            r.status_code = 401
            r._content = b""
            r.url = request.url or ""
            r.request = request
            return r

        def close(self) -> None:
            pass

    original = winrm.transport.Transport.build_session

    def build_session(self: winrm.transport.Transport) -> requests.Session:
        s = original(self)
        s.mount("https://", Deny())
        return s

    monkeypatch.setattr(winrm.transport.Transport, "build_session", build_session)
    with pytest.raises(AgentError) as exc:
        make_agent().wait_ready(2)
    assert "rejected the credentials" in str(exc.value) and USER in str(exc.value)
    assert PASSWORD not in str(exc.value)


def test_clean_clixml_passthrough() -> None:
    assert clean_clixml("plain error") == "plain error"


# ------------------------------------------------------------------ pywinrm lower bound (issue 10, point 5)

def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_pywinrm_pin_is_the_first_release_with_every_api_we_call() -> None:
    """pyproject's lower bound must be a pywinrm that has get_command_output_raw (0.5.0):
    with ``>=0.4.3`` every WinRM command failed with AttributeError."""
    import tomllib

    from lab.agent.winrm import PYWINRM_MIN_VERSION

    deps = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"^pywinrm\b", d, re.I)]
    assert len(pins) == 1, deps
    m = re.search(r">=\s*([0-9][0-9.]*)", pins[0])
    assert m, f"pywinrm has no lower bound: {pins[0]!r}"
    assert _version_tuple(m[1]) >= PYWINRM_MIN_VERSION, pins[0]
    # and the environment the tests run in satisfies it
    import winrm
    assert _version_tuple(winrm.__version__) >= PYWINRM_MIN_VERSION


def test_every_pywinrm_call_exists_on_the_installed_classes() -> None:
    """hasattr on pywinrm's real classes, and the keyword arguments we pass exist."""
    import inspect

    import winrm.exceptions
    import winrm.protocol

    from lab.agent.winrm import PYWINRM_EXCEPTIONS, PYWINRM_PROTOCOL_METHODS

    for name in PYWINRM_PROTOCOL_METHODS:
        assert callable(getattr(winrm.protocol.Protocol, name, None)), name
    for name in PYWINRM_EXCEPTIONS:
        assert isinstance(getattr(winrm.exceptions, name, None), type), name
    fault = winrm.exceptions.WSManFaultError(500, "m", "<r/>", "why", wsman_fault_code=5)
    assert fault.reason == "why" and fault.wsman_fault_code == 5
    params = inspect.signature(winrm.protocol.Protocol.__init__).parameters
    for kw in ("endpoint", "transport", "username", "password", "server_cert_validation",
               "ca_trust_path", "read_timeout_sec", "operation_timeout_sec", "message_encryption", "proxy"):
        assert kw in params, kw
    assert {"codepage", "noprofile"} <= set(inspect.signature(winrm.protocol.Protocol.open_shell).parameters)
    assert "skip_cmd_shell" in inspect.signature(winrm.protocol.Protocol.run_command).parameters
    assert hasattr(winrm.transport, "HAVE_KERBEROS") and hasattr(winrm.transport, "HAVE_CREDSSP")


def test_the_api_list_covers_every_protocol_call_in_the_agent() -> None:
    """Every ``protocol.X(...)`` / ``proto.X(...)`` in lab/agent/winrm.py is in the checked list,
    so a new call cannot slip past the version pin."""
    import ast

    import lab.agent.winrm as mod

    tree = ast.parse(Path(mod.__file__).read_text(encoding="utf-8"))
    called: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else (
                target.attr if isinstance(target, ast.Attribute) else "")
            if name in ("protocol", "proto", "_protocol"):
                called.add(node.func.attr)
    assert called, "no protocol calls found: the scan is broken"
    assert called <= set(mod.PYWINRM_PROTOCOL_METHODS), called - set(mod.PYWINRM_PROTOCOL_METHODS)
