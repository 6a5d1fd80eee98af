"""PowerShell quoting, encoded commands, parameterised scripts and JSON results.

No PowerShell runs here (Debian has no package for it). The round trip is checked
against the language's own grammar instead: the encoded command is decoded from
base64/UTF-16LE and each parameter literal is read back with a reader of the
specification's verbatim-string-literal rule, plus hand-written expectations taken
from about_Quoting_Rules, so a shared misunderstanding cannot pass unnoticed.
"""

from __future__ import annotations

import base64
import json

import pytest

from lab.agent.powershell import (
    JSON_MARKER,
    MAX_ENCODED_COMMAND,
    POWERSHELL,
    PsOutputError,
    build_script,
    decode_encoded_command,
    decode_structured,
    parse_ps_json,
    parse_single_quoted,
    script_params,
    structured_script,
)

HOSTILE = [
    "plain",
    "",
    "it's",
    "''",
    "'; Remove-Item -Recurse C:\\ ; '",
    "$(Stop-Computer -Force)",
    "${env:PATH}",
    "`n`t`0 backtick `",
    "a;b|c&d>e<f",
    "line1\nline2\r\nline3",
    "\u2018left\u2019 right\u201a low\u201b high",
    "\u2019\u2019\u2019",
    "mixed ' \u2018 \u2019 \u201a \u201b '",
    "\"double\" quotes and \u201csmart\u201d ones",
    "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&2411E6FE&0&10",
    "unicode: Grüße, 日本語, emoji \U0001F600",
    "@'\nhere-string\n'@",
    "#< CLIXML",
    "tab\there",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_quote_round_trips_through_the_grammar(value: str) -> None:
    lit = POWERSHELL.quote(value)
    back, end = parse_single_quoted(lit)
    assert back == value
    assert end == len(lit)


def test_quote_doubles_every_single_quote_character() -> None:
    # about_Quoting_Rules: a single quote inside a single-quoted string is written twice;
    # PowerShell treats U+2018..U+201B as single quotes too (language spec, B.1)
    assert POWERSHELL.quote("it's") == "'it''s'"
    assert POWERSHELL.quote("a\u2019b") == "'a\u2019\u2019b'"
    assert POWERSHELL.quote("\u2018\u201a\u201b") == "'\u2018\u2018\u201a\u201a\u201b\u201b'"
    assert POWERSHELL.quote("$x `y") == "'$x `y'"  # nothing else is special inside '...'


@pytest.mark.parametrize("bad", ["nul\x00byte", "lone \ud800 surrogate"])
def test_quote_refuses_what_cannot_travel(bad: str) -> None:
    with pytest.raises(ValueError):
        POWERSHELL.quote(bad)


def test_join_uses_the_call_operator() -> None:
    assert POWERSHELL.join(["logman.exe", "stop", "x y"]) == "& 'logman.exe' 'stop' 'x y'"


@pytest.mark.parametrize("arg", ['a"b', "", "C:\\dir with space\\"])
def test_native_refuses_arguments_powershell_51_would_mangle(arg: str) -> None:
    with pytest.raises(ValueError):
        POWERSHELL.native(["tool.exe", arg])


def test_native_accepts_ordinary_arguments() -> None:
    assert POWERSHELL.native(["pnputil.exe", "/add-driver", "C:\\drv\\x.inf"]) == \
        "& 'pnputil.exe' '/add-driver' 'C:\\drv\\x.inf'"


def test_encode_is_base64_of_utf16le() -> None:
    cmd = POWERSHELL.encode("Write-Output 'é'")
    assert cmd.startswith("powershell -NoProfile -NonInteractive -EncodedCommand ")
    b64 = cmd.rsplit(" ", 1)[1]
    assert base64.b64decode(b64).decode("utf-16-le") == "Write-Output 'é'"
    assert decode_encoded_command(cmd) == "Write-Output 'é'"
    # only base64 characters follow the fixed prefix: safe for cmd.exe and WinRS alike
    assert set(b64) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def test_encode_refuses_over_budget_scripts() -> None:
    with pytest.raises(ValueError, match="budget"):
        POWERSHELL.encode("x" * MAX_ENCODED_COMMAND)


def test_hostile_parameters_arrive_as_data_through_the_encoded_command() -> None:
    params = {f"V{i}": v for i, v in enumerate(HOSTILE)}
    template = "\n".join(f"Write-Output $p.V{i}" for i in range(len(HOSTILE)))
    script = build_script(template, params)
    decoded = decode_encoded_command(POWERSHELL.encode(script))
    assert decoded == script
    assert script_params(decoded) == params
    # the template part is untouched by the values: every value sits inside the $p block
    body = decoded.split("\n}\n", 1)[1]
    assert body.strip() == template


def test_build_script_checks_parameter_use() -> None:
    with pytest.raises(ValueError, match="not given"):
        build_script("Get-Item $p.Path", {})
    with pytest.raises(ValueError, match="not used"):
        build_script("Get-Item $p.Path", {"Path": "a", "Extra": "b"})
    with pytest.raises(ValueError, match="identifier"):
        build_script("x", {"bad-name": "v"})


def test_build_script_prelude_and_literals() -> None:
    s = build_script("$p.A; $p.B; $p.C; $p.D; $p.E", {"A": 5, "B": True, "C": None, "D": ["x", "y'"],
                                                     "E": {"k": "v"}})
    assert s.startswith("$ErrorActionPreference = 'Stop'\n$ProgressPreference = 'SilentlyContinue'\n")
    assert "    A = 5\n" in s and "    B = $true\n" in s and "    C = $null\n" in s
    assert "    D = @('x', 'y''')\n" in s and "    E = @{'k' = 'v'}\n" in s


def _marker(obj: object) -> str:
    return JSON_MARKER + base64.b64encode(json.dumps(obj).encode("utf-8")).decode("ascii")


def test_structured_script_shape() -> None:
    s = structured_script("Get-Item -LiteralPath $p.Path", {"Path": "C:\\x"}, depth=3)
    assert "$__rebalab_out = @(& {\nGet-Item -LiteralPath $p.Path\n})" in s
    assert "ConvertTo-Json -InputObject $__rebalab_out -Depth 3 -Compress" in s
    assert "[Text.Encoding]::UTF8.GetBytes" in s


def test_decode_structured_ignores_noise_and_handles_unicode() -> None:
    out = "WARNING: something\r\n" + _marker([{"Name": "Grüße \u2019"}]) + "\r\n"
    assert decode_structured(out) == [{"Name": "Grüße \u2019"}]


@pytest.mark.parametrize("stdout", ["", "no marker here\n", JSON_MARKER + "!!!notbase64\n",
                                    _marker([1]) + "\n" + _marker([2]) + "\n"])
def test_decode_structured_errors_are_clear(stdout: str) -> None:
    with pytest.raises(PsOutputError):
        decode_structured(stdout)


def test_parse_ps_json_quirks() -> None:
    assert parse_ps_json("") == []
    assert parse_ps_json("  \r\n") == []
    assert parse_ps_json("null") == []
    assert parse_ps_json('{"a":1}') == [{"a": 1}]                      # one object, not a list
    assert parse_ps_json('[{"a":1},{"a":2}]') == [{"a": 1}, {"a": 2}]
    assert parse_ps_json("\ufeff[1]") == [1]                           # BOM as text
    assert parse_ps_json(b"\xef\xbb\xbf[2]") == [2]                    # BOM as bytes
    assert parse_ps_json("[3]".encode("utf-16")) == [3]                # UTF-16 with BOM
    d = parse_ps_json('{"t":"\\/Date(1700000000123)\\/"}')[0]["t"]
    assert d.isoformat() == "2023-11-14T22:13:20.123000+00:00"
    d2 = parse_ps_json('{"t":"\\/Date(1700000000123+0100)\\/"}')[0]["t"]
    assert d2 == d                                                     # offset does not shift the instant
    wrapped = parse_ps_json('{"value":[1,2],"Count":2}')
    assert wrapped == [1, 2]                                           # 5.1 array wrapper
    dt = parse_ps_json('{"value":"\\/Date(0)\\/","DisplayHint":2,"DateTime":"Thursday"}')[0]
    assert dt.year == 1970
    raw = parse_ps_json('{"t":"\\/Date(5)\\/"}', convert_dates=False)
    assert raw == [{"t": "/Date(5)/"}]


def test_parse_ps_json_malformed_names_the_position() -> None:
    with pytest.raises(PsOutputError, match="line 1 column"):
        parse_ps_json('[{"a":1},')
