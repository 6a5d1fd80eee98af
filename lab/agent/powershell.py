"""PowerShell as the guest shell: quoting, encoded commands, parameterised scripts and
structured (JSON) results.

Why it is built this way
------------------------
* Every value the lab sends into a Windows guest (a device instance id, a path, a GUID)
  travels as a *single-quoted* PowerShell literal. Inside single quotes PowerShell
  expands nothing (no ``$var``, no ``$(...)``, no backtick escapes); the only special
  characters are the single quotes themselves, which are written twice. PowerShell also
  treats the typographic single quotes U+2018, U+2019, U+201A and U+201B as quote
  characters (Windows PowerShell Language Specification 3.0, B.1 lexical grammar,
  ``single-quote-character``; ``about_Quoting_Rules``: "PowerShell treats smart quotation
  marks ... as normal quotation marks for strings"), so those are doubled as well.
  This is what PowerShell's own ``CodeGeneration.EscapeSingleQuotedStringContent`` does.
* A script never has values pasted into its text. ``build_script`` prepends one
  hashtable ``$p = @{ Name = '<literal>'; ... }`` and the fixed template reads
  ``$p.Name``. A hostile value therefore arrives as data, whatever it contains.
* Scripts are sent as ``powershell -EncodedCommand <base64 of UTF-16LE>``
  (``about_PowerShell_exe``: "-EncodedCommand Accepts a base-64-encoded string version of
  a command"), so neither cmd.exe nor WinRS ever parses the script text.
* Structured results: the script's output is serialised with ``ConvertTo-Json -Depth N
  -Compress``, then base64-encoded from UTF-8 behind a marker. The base64 step makes
  the result independent of the console code page (WinRS defaults to 437) and of
  stray text on stdout; ``parse_ps_json`` then smooths Windows PowerShell 5.1's JSON
  quirks (single object vs array, ``\\/Date(ms)\\/``, the ``{"value": [...], "Count": n}``
  array wrapper, a UTF-8 BOM, empty output).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Union

from lab.agent.base import Shell
from lab.errors import AgentError

# U+0027 plus the four typographic single quotes PowerShell's tokenizer accepts.
SINGLE_QUOTES = "'\u2018\u2019\u201a\u201b"
_SQ_SET = frozenset(SINGLE_QUOTES)

JSON_MARKER = "REBALAB-JSON:"
"""Prefix of the one stdout line that carries a structured result (base64 of UTF-8 JSON)."""

# Command lines: CreateProcess accepts 32767 characters; WinRS with
# WINRS_SKIP_CMD_SHELL=TRUE hands the line to CreateProcess without cmd.exe (whose own
# limit is 8191). Keep a margin for the executable name and options.
MAX_ENCODED_COMMAND = 30_000

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PARAM_REF_RE = re.compile(r"\$p\.([A-Za-z_][A-Za-z0-9_]*)")

PsValue = Union[str, int, bool, None, Sequence["PsValue"], Mapping[str, "PsValue"]]


class PsOutputError(AgentError):
    """The guest's output could not be read as the structured result we asked for."""

    def __init__(self, message: str, output: str = "") -> None:
        self.output = output
        tail = output.strip()[-200:]
        super().__init__(message + (f" (output tail: {tail!r})" if tail else " (output was empty)"))


def _check_text(value: str) -> None:
    """Reject what cannot travel through Win32 strings intact.

    NUL terminates C strings in every API on the way (WinRS, CreateProcess); a lone
    surrogate cannot be encoded as UTF-16LE. Both would silently change the data, so
    they are refused up front with a clear message.
    """
    if "\x00" in value:
        raise ValueError("PowerShell values cannot contain NUL characters")
    try:
        value.encode("utf-16-le")
    except UnicodeEncodeError as exc:
        raise ValueError(f"value is not valid Unicode text (lone surrogate at {exc.start})") from None


class PowerShell(Shell):
    """Quoting rules of Windows PowerShell 5.1 (and PowerShell 7, which share them)."""

    name = "powershell"

    def quote(self, value: str) -> str:
        """``value`` as a single-quoted literal; every single-quote character doubled."""
        if not isinstance(value, str):
            raise TypeError(f"quote() takes str, not {type(value).__name__}")
        _check_text(value)
        out = []
        for ch in value:
            if ch in _SQ_SET:
                out.append(ch)
            out.append(ch)
        return "'" + "".join(out) + "'"

    def join(self, argv: Sequence[str]) -> str:
        """A command invocation: ``& 'cmd' 'arg1' ...``.

        The call operator is needed because a quoted first word is otherwise a string
        expression, not a command. For native executables prefer ``native()``, which
        also checks the Windows PowerShell 5.1 argument-passing pitfalls.
        """
        if not argv:
            raise ValueError("empty command")
        return "& " + " ".join(self.quote(a) for a in argv)

    def native(self, argv: Sequence[str]) -> str:
        """Invocation of a native program (logman, pnputil, tracefmt) from PowerShell.

        Windows PowerShell 5.1 rebuilds the native command line itself: it wraps an
        argument that contains whitespace in double quotes but does not escape embedded
        double quotes, drops empty arguments, and a trailing backslash before its
        closing quote escapes that quote under the MSVC rules. Such arguments would
        reach the program changed, so they are refused rather than mangled.
        """
        for a in argv:
            if a == "":
                raise ValueError("native arguments cannot be empty (Windows PowerShell drops them)")
            if '"' in a:
                raise ValueError(f"native argument contains a double quote: {a!r}")
            if a.endswith("\\") and any(c.isspace() for c in a):
                raise ValueError(f"native argument with spaces cannot end in a backslash: {a!r}")
        return self.join(argv)

    def literal(self, value: PsValue) -> str:
        """Any supported Python value as a PowerShell literal expression."""
        if value is None:
            return "$null"
        if isinstance(value, bool):
            return "$true" if value else "$false"
        if isinstance(value, int):
            # decimal literals up to int64 are typed as int/long; beyond that use a string
            if -(2**63) <= value < 2**63:
                return str(value)
            raise ValueError(f"integer out of range for PowerShell: {value}")
        if isinstance(value, str):
            return self.quote(value)
        if isinstance(value, Mapping):
            items = []
            for k, v in value.items():
                if not isinstance(k, str):
                    raise TypeError("hashtable keys must be str")
                items.append(f"{self.quote(k)} = {self.literal(v)}")
            return "@{" + "; ".join(items) + "}"
        if isinstance(value, Sequence):
            return "@(" + ", ".join(self.literal(v) for v in value) + ")"
        raise TypeError(f"cannot pass {type(value).__name__} to PowerShell")

    def encode(self, script: str, limit: int = MAX_ENCODED_COMMAND) -> str:
        """``powershell -NoProfile -NonInteractive -EncodedCommand <b64 UTF-16LE>``.

        ``limit`` is the caller's command-line budget (8191 through cmd.exe, e.g. an
        SSH session whose default shell is cmd; 32767 for CreateProcess).
        """
        _check_text(script)
        b64 = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
        cmd = f"powershell -NoProfile -NonInteractive -EncodedCommand {b64}"
        if len(cmd) > limit:
            raise ValueError(
                f"encoded script is {len(cmd)} characters, over the {limit}-character "
                "command-line budget; send data in chunks (the WinRM agent's put() does)")
        return cmd


POWERSHELL = PowerShell()

PRELUDE = (
    "$ErrorActionPreference = 'Stop'\n"
    "$ProgressPreference = 'SilentlyContinue'\n"
)
"""Every script stops on the first error and emits no progress records (which WinRM
would otherwise return as CLIXML on stderr)."""


def build_script(template: str, params: Mapping[str, PsValue] | None = None) -> str:
    """A fixed ``template`` preceded by ``$p = @{...}`` holding ``params`` as literals.

    The template must reference each parameter as ``$p.Name``; a parameter the template
    does not use, or a ``$p.X`` the caller did not supply, is a programming error and
    raises ``ValueError`` (it would otherwise silently be ``$null`` in the guest).
    """
    params = dict(params or {})
    for key in params:
        if not _IDENT_RE.match(key):
            raise ValueError(f"parameter name must be an identifier: {key!r}")
    used = set(_PARAM_REF_RE.findall(template))
    missing = sorted(used - params.keys())
    unused = sorted(params.keys() - used)
    if missing:
        raise ValueError(f"template uses parameters that were not given: {missing}")
    if unused:
        raise ValueError(f"parameters not used by the template: {unused}")
    lines = [PRELUDE.rstrip("\n")]
    if params:
        lines.append("$p = @{")
        for key in sorted(params):
            lines.append(f"    {key} = {POWERSHELL.literal(params[key])}")
        lines.append("}")
    lines.append(template.strip("\n"))
    return "\n".join(lines) + "\n"


def structured_script(template: str, params: Mapping[str, PsValue] | None = None,
                      depth: int = 5) -> str:
    """Like ``build_script`` but the template's output becomes one marker line.

    ``@(& { ... })`` collects the output as an array even when it is empty or one
    object; ``ConvertTo-Json -InputObject`` keeps that array an array; the UTF-8 bytes
    are base64-encoded so that neither the console code page nor line wrapping can
    alter them.
    """
    if not 1 <= depth <= 100:
        raise ValueError("ConvertTo-Json -Depth must be within 1..100")
    body = (
        "$__rebalab_out = @(& {\n"
        + template.strip("\n")
        + "\n})\n"
        + f"$__rebalab_json = ConvertTo-Json -InputObject $__rebalab_out -Depth {depth} -Compress\n"
        + "[Console]::Out.WriteLine("
        + POWERSHELL.quote(JSON_MARKER)
        + " + [Convert]::ToBase64String([Text.Encoding]::UTF8.GetBytes([string]$__rebalab_json)))\n"
    )
    return build_script(body, params)


# ---------------------------------------------------------------- file transfer templates
# Byte-exact file copy through PowerShell, for agents with no file channel (WinRM) and
# as the Windows SSH agent's fallback when the guest offers no SFTP subsystem. Bytes
# travel base64-encoded inside the script ($p.Data) and are written with .NET's
# System.IO.File/FileStream (binary), never through the text pipeline (Get-Content /
# Set-Content, which decode and re-encode text and add or drop line endings). A copy goes
# to ``<path>.rebalab-part``, is checked by SHA-256 (FILE_HASH_PREFIX, which hashes the
# first Length bytes, or the whole file for -1) and is moved into place only then.

FILE_PUT_BEGIN = """
$dir = Split-Path -Parent $p.Path
if ($dir -and -not (Test-Path -LiteralPath $dir)) { New-Item -ItemType Directory -Path $dir -Force | Out-Null }
[IO.File]::WriteAllBytes($p.Part, [byte[]]@())
"""
FILE_PUT_CHUNK = """
$b = [Convert]::FromBase64String($p.Data)
$f = [IO.File]::Open($p.Part, [IO.FileMode]::Append, [IO.FileAccess]::Write)
try { $f.Write($b, 0, $b.Length) } finally { $f.Dispose() }
"""
FILE_HASH_PREFIX = """
$f = [IO.File]::Open($p.Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
try {
    $len = if ($p.Length -lt 0) { $f.Length } else { [int64]$p.Length }
    $sha = [Security.Cryptography.SHA256]::Create()
    $buf = New-Object byte[] 1048576
    $left = $len
    while ($left -gt 0) {
        $n = $f.Read($buf, 0, [int][Math]::Min([int64]$buf.Length, $left))
        if ($n -le 0) { break }
        [void]$sha.TransformBlock($buf, 0, $n, $null, 0)
        $left -= $n
    }
    [void]$sha.TransformFinalBlock($buf, 0, 0)
    [pscustomobject]@{ Length = $len - $left; Sha256 = [BitConverter]::ToString($sha.Hash).Replace('-', '') }
} finally { $f.Dispose() }
"""
FILE_PUT_COMMIT = """
Move-Item -LiteralPath $p.Part -Destination $p.Path -Force
"""
FILE_GET_CHUNK = """
$f = [IO.File]::Open($p.Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
try {
    [void]$f.Seek([int64]$p.Offset, [IO.SeekOrigin]::Begin)
    $buf = New-Object byte[] ([int]$p.Count)
    $n = 0
    while ($n -lt $buf.Length) { $r = $f.Read($buf, $n, $buf.Length - $n); if ($r -le 0) { break }; $n += $r }
    [Console]::Out.WriteLine([Convert]::ToBase64String($buf, 0, $n))
} finally { $f.Dispose() }
"""


# ---------------------------------------------------------------- reading it back

_DATE_RE = re.compile(r"^/Date\((-?\d+)([+-]\d{4})?\)/$")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def ps_date(value: str) -> datetime | None:
    """``/Date(1700000000123)/`` (what ``\\/Date(...)\\/`` decodes to) as aware UTC.

    The milliseconds are UTC (the .NET JavaScriptSerializer convention); an optional
    ``+hhmm`` suffix only records the writer's offset and does not shift the instant.
    """
    m = _DATE_RE.match(value)
    if not m:
        return None
    return _EPOCH + timedelta(milliseconds=int(m[1]))


def _normalise(value: Any, convert_dates: bool) -> Any:
    if isinstance(value, str):
        if convert_dates and value.startswith("/Date("):
            d = ps_date(value)
            return d if d is not None else value
        return value
    if isinstance(value, list):
        return [_normalise(v, convert_dates) for v in value]
    if isinstance(value, dict):
        # Windows PowerShell 5.1 serialises an array that carries extended-type-system
        # properties as {"value": [...], "Count": n}
        if set(value) == {"value", "Count"} and isinstance(value["value"], list):
            return _normalise(value["value"], convert_dates)
        # ...and a DateTime from a cmdlet as {"value": "/Date(..)/", "DisplayHint": n, "DateTime": "..."}
        if "value" in value and "DisplayHint" in value and isinstance(value["value"], str):
            d = ps_date(value["value"]) if convert_dates else None
            if d is not None:
                return d
        return {k: _normalise(v, convert_dates) for k, v in value.items()}
    return value


def parse_ps_json(text: str | bytes, *, convert_dates: bool = True) -> list[Any]:
    """Output of ``ConvertTo-Json`` as a list, whatever shape PowerShell chose.

    Empty output means "no objects" (``[]``); a single object becomes a one-element
    list; a BOM is dropped. Malformed JSON raises ``PsOutputError`` naming the position.
    """
    if isinstance(text, bytes):
        raw_bytes = text
        for enc in ("utf-8-sig", "utf-16"):
            try:
                text = raw_bytes.decode(enc)
                break
            except UnicodeDecodeError:
                continue
        else:
            raise PsOutputError("guest output is neither UTF-8 nor UTF-16")
    assert isinstance(text, str)
    stripped = text.lstrip("\ufeff").strip()
    if not stripped or stripped == "null":
        return []
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise PsOutputError(f"malformed JSON from the guest at line {exc.lineno} column {exc.colno}: "
                            f"{exc.msg}", stripped) from None
    value = _normalise(value, convert_dates)
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def decode_structured(stdout: str, *, convert_dates: bool = True) -> list[Any]:
    """The structured result of a ``structured_script`` run from its stdout.

    Exactly one marker line is expected; anything else on stdout (a warning a cmdlet
    wrote, a banner) is ignored. No marker at all means the script died before it
    could report, which is an error, not an empty result.
    """
    payloads = [line.strip()[len(JSON_MARKER):] for line in stdout.splitlines()
                if line.strip().startswith(JSON_MARKER)]
    if not payloads:
        raise PsOutputError("the guest script produced no structured result", stdout)
    if len(payloads) > 1:
        raise PsOutputError(f"the guest script produced {len(payloads)} structured results, expected 1",
                            stdout)
    try:
        raw = base64.b64decode(payloads[0], validate=True)
    except (ValueError, binascii.Error):
        raise PsOutputError("the structured result is not valid base64 (truncated output?)",
                            stdout) from None
    return parse_ps_json(raw, convert_dates=convert_dates)


def decode_encoded_command(cmdline: str) -> str:
    """The script inside a ``... -EncodedCommand <b64>`` command line.

    Used for logs and golden files: what a person reviews is the script, not base64.
    """
    m = re.search(r"-EncodedCommand\s+([A-Za-z0-9+/=]+)\s*$", cmdline, re.I)
    if not m:
        raise ValueError("not an -EncodedCommand command line")
    return base64.b64decode(m[1]).decode("utf-16-le")


def parse_single_quoted(text: str, start: int = 0) -> tuple[str, int]:
    """Read one single-quoted literal at ``text[start]``; returns (value, end index).

    Follows the language specification's grammar (verbatim-string-literal: any
    character but a single-quote-character, or two single-quote-characters standing
    for the second one). Used to show and check what the lab sent.
    """
    if start >= len(text) or text[start] not in _SQ_SET:
        raise ValueError(f"no single-quoted literal at offset {start}")
    out = []
    i = start + 1
    while i < len(text):
        ch = text[i]
        if ch in _SQ_SET:
            if i + 1 < len(text) and text[i + 1] in _SQ_SET:
                out.append(text[i + 1])
                i += 2
                continue
            return "".join(out), i + 1
        out.append(ch)
        i += 1
    raise ValueError("unterminated single-quoted literal")


def script_params(script: str) -> dict[str, str]:
    """The string parameters of a ``build_script`` script, read back from its header.

    Only ``Name = '<literal>'`` entries are returned (what hostile text travels in);
    used by tests and by people checking a golden file against what was meant.
    """
    out: dict[str, str] = {}
    m = re.search(r"^\$p = @\{\n(.*?)^\}$", script, re.S | re.M)
    if not m:
        return out
    block = m[1]
    pos = 0
    key_re = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*) = ")
    while pos < len(block):
        km = key_re.match(block, pos)
        if not km:
            break
        pos = km.end()
        if pos < len(block) and block[pos] in _SQ_SET:
            value, pos = parse_single_quoted(block, pos)
            out[km[1]] = value
        else:
            # a non-string value (number, $true, @(...)): skip to the end of the line,
            # stepping over any string literals inside it (they may hold newlines)
            while pos < len(block) and block[pos] != "\n":
                if block[pos] in _SQ_SET:
                    _, pos = parse_single_quoted(block, pos)
                else:
                    pos += 1
        if pos < len(block) and block[pos] == "\n":
            pos += 1
    return out
