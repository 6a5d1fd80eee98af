"""Render and validate autounattend.xml for the supported Windows editions.

Rendering uses Jinja2 with autoescaping, so a password or user name containing ``<``,
``&`` or quotes is XML-escaped, never markup. Validation parses the result with
``xml.etree`` and checks what Windows Setup needs from us: the three passes
(windowsPE, specialize, oobeSystem), the components in each, the partition layout
matching the firmware (GPT EFI/MSR/Windows for UEFI, MBR System/Windows for BIOS),
the image selection, and the FirstLogonCommands that start provisioning.

The password is a parameter of ``render`` only; it comes from the environment or a
prompt (lab.guest.windows.image) and is written nowhere but the temporary provisioning
drive.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jinja2

from lab.errors import ConfigError

NS = {"u": "urn:schemas-microsoft-com:unattend", "wcm": "http://schemas.microsoft.com/WMIConfig/2002/State"}
PROVISION_LABEL = "REBAPROV"
PASSES = ("windowsPE", "specialize", "oobeSystem")
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    "windowsPE": ("Microsoft-Windows-International-Core-WinPE", "Microsoft-Windows-Setup"),
    "specialize": ("Microsoft-Windows-Shell-Setup",),
    "oobeSystem": ("Microsoft-Windows-International-Core", "Microsoft-Windows-Shell-Setup"),
}

Firmware = Literal["uefi", "bios"]


@dataclass(frozen=True)
class Edition:
    key: str
    image_name: str          # the install.wim image NAME (DISM /Get-WimInfo shows it)
    is_server: bool
    windows11: bool
    virtio_dir: str          # virtio-win driver directory name for this release


EDITIONS: dict[str, Edition] = {
    "win10": Edition("win10", "Windows 10 Pro", False, False, "w10"),
    "win11": Edition("win11", "Windows 11 Pro", False, True, "w11"),
    "server2019": Edition("server2019", "Windows Server 2019 SERVERDATACENTER", True, False, "2k19"),
    "server2022": Edition("server2022", "Windows Server 2022 SERVERDATACENTER", True, False, "2k22"),
    "server2025": Edition("server2025", "Windows Server 2025 SERVERDATACENTER", True, False, "2k25"),
}


def edition(key: str) -> Edition:
    try:
        return EDITIONS[key]
    except KeyError:
        raise ConfigError(f"unknown Windows edition {key!r}; one of {', '.join(EDITIONS)}") from None


@dataclass(frozen=True)
class Locale:
    ui_language: str = "en-US"
    input_locale: str = "en-US"
    system_locale: str = "en-US"
    user_locale: str = "en-US"

    @classmethod
    def single(cls, tag: str) -> Locale:
        import re

        if not re.match(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$", tag):
            raise ConfigError(f"not a locale tag: {tag!r} (like en-US)")
        return cls(tag, tag, tag, tag)


def template_dir() -> Path:
    """images/windows of the source tree (REBALAB_WINDOWS_TEMPLATES overrides)."""
    env = os.environ.get("REBALAB_WINDOWS_TEMPLATES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "images" / "windows"


def first_logon_command(label: str = PROVISION_LABEL) -> str:
    """Find the provisioning drive by its volume label and run provision.ps1 from it."""
    return ("powershell.exe -NoProfile -ExecutionPolicy Bypass -Command "
            f"\"$v = Get-Volume -FileSystemLabel '{label}' | Select-Object -First 1; "
            "$d = $v.DriveLetter + ':'; & ($d + '\\provision.ps1') -Drive $d\"")


def virtio_driver_paths(ed: Edition, letters: str = "DEFGH") -> list[str]:
    """Where the virtio-win ISO's storage driver can be while Setup runs.

    The CD's drive letter in Windows PE is not fixed; Setup skips paths that do not
    exist, so every likely letter is listed.
    """
    return [f"{letter}:\\viostor\\{ed.virtio_dir}\\amd64" for letter in letters]


def render(*, edition_key: str, firmware: Firmware, admin_user: str, admin_password: str,
           image_name: str | None = None, image_index: int | None = None, locale: Locale | None = None,
           computer_name: str = "REBALAB-WIN", product_key: str | None = None,
           with_virtio: bool = False, label: str = PROVISION_LABEL,
           templates: Path | None = None) -> str:
    """The autounattend.xml text. Validates its own output before returning it."""
    ed = edition(edition_key)
    if firmware not in ("uefi", "bios"):
        raise ConfigError(f"firmware must be uefi or bios, not {firmware!r}")
    if not admin_user or any(c in admin_user for c in '/\\[]:;|=,+*?<>"@') or len(admin_user) > 20:
        raise ConfigError(f"not a valid local account name: {admin_user!r}")
    if not admin_password:
        raise ConfigError("the administrator password is empty")
    if image_name is not None and image_index is not None:
        raise ConfigError("give an image name or an image index, not both")
    if image_index is not None and image_index < 1:
        raise ConfigError("image index starts at 1")
    if len(computer_name) > 15 or not computer_name.replace("-", "").isalnum():
        raise ConfigError(f"computer name must be 1-15 letters, digits or '-': {computer_name!r}")
    key, value = (("/IMAGE/INDEX", str(image_index)) if image_index is not None
                  else ("/IMAGE/NAME", image_name or ed.image_name))
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates or template_dir())),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    try:
        tmpl = env.get_template("autounattend.xml.j2")
    except jinja2.TemplateNotFound:
        raise ConfigError(f"autounattend.xml.j2 not found in {templates or template_dir()}") from None
    text = tmpl.render(
        locale=locale or Locale(), firmware=firmware, admin_user=admin_user,
        admin_password=admin_password, image_key=key, image_value=value,
        install_partition=3 if firmware == "uefi" else 2, product_key=product_key,
        computer_name=computer_name, is_server=ed.is_server, windows11_bypass=ed.windows11,
        driver_paths=virtio_driver_paths(ed) if with_virtio else [],
        provision_label=label, first_logon_command=first_logon_command(label),
    )
    validate(text, firmware=firmware)
    return text


def _components(root: ET.Element, pass_name: str) -> dict[str, ET.Element]:
    out: dict[str, ET.Element] = {}
    for settings in root.findall("u:settings", NS):
        if settings.get("pass") == pass_name:
            for comp in settings.findall("u:component", NS):
                out[comp.get("name", "")] = comp
    return out


def validate(text: str, *, firmware: Firmware) -> ET.Element:
    """Parse and check an answer file; ConfigError says what is wrong."""
    try:
        root = ET.fromstring(text.encode("utf-8"))
    except ET.ParseError as exc:
        raise ConfigError(f"autounattend.xml is not well-formed XML: {exc}") from None
    if root.tag != f"{{{NS['u']}}}unattend":
        raise ConfigError(f"root element is {root.tag}, expected unattend in {NS['u']}")
    passes = [s.get("pass") for s in root.findall("u:settings", NS)]
    for p in PASSES:
        if p not in passes:
            raise ConfigError(f"autounattend.xml lacks the {p} pass")
    for p, names in REQUIRED_COMPONENTS.items():
        comps = _components(root, p)
        for n in names:
            c = comps.get(n)
            if c is None:
                raise ConfigError(f"autounattend.xml pass {p} lacks component {n}")
            for attr, want in (("processorArchitecture", "amd64"), ("publicKeyToken", "31bf3856ad364e35"),
                               ("language", "neutral"), ("versionScope", "nonSxS")):
                if c.get(attr) != want:
                    raise ConfigError(f"component {n} in {p}: {attr}={c.get(attr)!r}, expected {want!r}")
    setup = _components(root, "windowsPE")["Microsoft-Windows-Setup"]
    types = [e.text for e in setup.findall(".//u:CreatePartition/u:Type", NS)]
    want_types = ["EFI", "MSR", "Primary"] if firmware == "uefi" else ["Primary", "Primary"]
    if types != want_types:
        raise ConfigError(f"partitions {types} do not fit {firmware} firmware (expected {want_types})")
    part = setup.find(".//u:ImageInstall/u:OSImage/u:InstallTo/u:PartitionID", NS)
    if part is None or part.text != ("3" if firmware == "uefi" else "2"):
        raise ConfigError("InstallTo/PartitionID does not point at the Windows partition")
    key = setup.find(".//u:InstallFrom/u:MetaData/u:Key", NS)
    val = setup.find(".//u:InstallFrom/u:MetaData/u:Value", NS)
    if key is None or key.text not in ("/IMAGE/NAME", "/IMAGE/INDEX") or val is None or not val.text:
        raise ConfigError("no image selection (InstallFrom/MetaData /IMAGE/NAME or /IMAGE/INDEX)")
    shell = _components(root, "oobeSystem")["Microsoft-Windows-Shell-Setup"]
    cmd = shell.find(".//u:FirstLogonCommands/u:SynchronousCommand/u:CommandLine", NS)
    if cmd is None or "provision.ps1" not in (cmd.text or ""):
        raise ConfigError("FirstLogonCommands does not run provision.ps1")
    if shell.find(".//u:AutoLogon/u:Enabled", NS) is None:
        raise ConfigError("AutoLogon is required for FirstLogonCommands to run unattended")
    return root
