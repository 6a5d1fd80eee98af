"""autounattend.xml for every edition and firmware: renders, parses, has what Setup needs."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from lab.errors import ConfigError
from lab.guest.windows import unattend

NS = unattend.NS
PASSWORD = "P@ss<w&rd>'\"]]>"


@pytest.mark.parametrize("firmware", ["uefi", "bios"])
@pytest.mark.parametrize("edition", sorted(unattend.EDITIONS))
def test_renders_and_validates(edition: str, firmware: str) -> None:
    text = unattend.render(edition_key=edition, firmware=firmware, admin_user="rebalab",  # type: ignore[arg-type]
                           admin_password=PASSWORD, with_virtio=True)
    root = ET.fromstring(text.encode())
    passes = [s.get("pass") for s in root.findall("u:settings", NS)]
    assert passes == ["windowsPE", "specialize", "oobeSystem"]
    ed = unattend.EDITIONS[edition]
    setup = root.find("u:settings[@pass='windowsPE']/u:component[@name='Microsoft-Windows-Setup']", NS)
    assert setup is not None
    types = [t.text for t in setup.findall(".//u:CreatePartition/u:Type", NS)]
    assert types == (["EFI", "MSR", "Primary"] if firmware == "uefi" else ["Primary", "Primary"])
    formats = [f.text for f in setup.findall(".//u:ModifyPartition/u:Format", NS)]
    assert formats == (["FAT32", "NTFS"] if firmware == "uefi" else ["NTFS", "NTFS"])
    assert setup.findtext(".//u:InstallFrom/u:MetaData/u:Key", namespaces=NS) == "/IMAGE/NAME"
    assert setup.findtext(".//u:InstallFrom/u:MetaData/u:Value", namespaces=NS) == ed.image_name
    bypass = "LabConfig /v BypassTPMCheck" in text and "BypassSecureBootCheck" in text
    assert bypass == ed.windows11
    # the password survives XML escaping exactly
    values = [v.text for v in root.iter(f"{{{NS['u']}}}Value") if v.text == PASSWORD]
    assert len(values) == 3  # AdministratorPassword, LocalAccount, AutoLogon
    cmd = root.findtext(".//u:FirstLogonCommands/u:SynchronousCommand/u:CommandLine", namespaces=NS)
    assert cmd is not None and "Get-Volume -FileSystemLabel 'REBAPROV'" in cmd and "provision.ps1" in cmd
    drivers = [p.text for p in root.findall(".//u:PathAndCredentials/u:Path", NS)]
    assert f"E:\\viostor\\{ed.virtio_dir}\\amd64" in drivers
    assert root.findtext(".//u:TimeZone", namespaces=NS) == "UTC"


def test_image_index_selection_and_locale() -> None:
    text = unattend.render(edition_key="server2022", firmware="uefi", admin_user="lab", admin_password="x",
                           image_index=4, locale=unattend.Locale.single("de-DE"))
    root = ET.fromstring(text.encode())
    assert root.findtext(".//u:InstallFrom/u:MetaData/u:Key", namespaces=NS) == "/IMAGE/INDEX"
    assert root.findtext(".//u:InstallFrom/u:MetaData/u:Value", namespaces=NS) == "4"
    assert root.findtext(".//u:UILanguage", namespaces=NS) == "de-DE"
    assert "PnpCustomizationsWinPE" not in text  # no virtio-win: no driver paths


@pytest.mark.parametrize("kwargs,match", [
    ({"edition_key": "win95"}, "unknown Windows edition"),
    ({"firmware": "coreboot"}, "firmware"),
    ({"admin_user": "a/b"}, "account name"),
    ({"admin_password": ""}, "empty"),
    ({"image_name": "x", "image_index": 1}, "not both"),
    ({"computer_name": "way-too-long-computer-name"}, "computer name"),
    ({"locale": None, "image_index": 0}, "starts at 1"),
])
def test_bad_input(kwargs: dict, match: str) -> None:
    base = {"edition_key": "win11", "firmware": "uefi", "admin_user": "rebalab", "admin_password": "pw"}
    base.update({k: v for k, v in kwargs.items() if v is not None})
    with pytest.raises(ConfigError, match=match):
        unattend.render(**base)  # type: ignore[arg-type]


def test_validate_rejects_broken_files() -> None:
    good = unattend.render(edition_key="win10", firmware="bios", admin_user="u", admin_password="p")
    with pytest.raises(ConfigError, match="well-formed"):
        unattend.validate(good[:-30], firmware="bios")
    with pytest.raises(ConfigError, match="do not fit"):
        unattend.validate(good, firmware="uefi")
    with pytest.raises(ConfigError, match="specialize"):
        unattend.validate(good.replace('pass="specialize"', 'pass="auditUser"'), firmware="bios")
    with pytest.raises(ConfigError, match="provision.ps1"):
        unattend.validate(good.replace("provision.ps1", "other.ps1"), firmware="bios")
    with pytest.raises(ConfigError, match="publicKeyToken"):
        unattend.validate(good.replace("31bf3856ad364e35", "0000000000000000", 1), firmware="bios")
