<#
.SYNOPSIS
    rebalab guest provisioning, run once by FirstLogonCommands from the provisioning
    drive (volume label REBAPROV). Idempotent: every step checks before it changes, so
    running it again is harmless.

.DESCRIPTION
    Reads provision.json from the drive (written by `rebalab image windows`), then:
      1. removes the auto-logon password and cached answer files (they hold the password)
      2. OpenSSH Server: capability, service, administrators_authorized_keys with the
         lab's public key and the ACL sshd requires (SYSTEM and Administrators only),
         default shell left as it is (cmd.exe)
      3. WinRM over HTTPS with a self-signed certificate (thumbprint recorded,
         public certificate exported for the host to validate against)
      4. firewall: inbound TCP 22 and 5986 only (WinRM over HTTP rules disabled)
      5. bcdedit /set testsigning on
      6. crash dumps: kernel memory dump, kept, overwritten
      7. Kernel-PnP ETW AutoLogger (boot-time PnP trace)
      8. SetupAPI device-install log at verbose level
      9. optional driver: test certificate into Root and TrustedPublisher,
         pnputil /add-driver <inf> /subdirs /install, result in manifest.json
         (259 = staged, no matching device: the install VM has none)
      9b. optional WDTF runtime (--wdtf): msiexec /i of each *WDTF*.msi, then a check
         that the WDTF COM object can be created; result in manifest.json
     10. guest facts (edition, build, SSH host key + fingerprint, WinRM thumbprint)
         to facts.json, which the image builder reads back
     11. shut down (the builder waits for the power-off)

    Documentation each step follows is named in the step's comment.
    Windows PowerShell 5.1 (every supported edition ships it).
#>
[CmdletBinding()]
param(
    [Parameter(Mandatory = $true)][string]$Drive
)

$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$Drive = $Drive.TrimEnd('\')
$utf8 = New-Object System.Text.UTF8Encoding($false)
Start-Transcript -Path (Join-Path $Drive 'provision.log') -Append | Out-Null

$config = Get-Content -LiteralPath (Join-Path $Drive 'provision.json') -Raw | ConvertFrom-Json
$results = [ordered]@{}
$facts = [ordered]@{ schema = 1; started_utc = [DateTime]::UtcNow.ToString('o') }

function Invoke-Step([string]$Name, [scriptblock]$Body) {
    # each step reports ok / its error and the run goes on: one broken feature must
    # not cost the whole image, and facts.json says exactly what is missing
    try {
        $detail = & $Body
        $results[$Name] = [ordered]@{ ok = $true; detail = $detail }
    } catch {
        $results[$Name] = [ordered]@{ ok = $false; detail = [string]$_.Exception.Message }
        Write-Warning "step $Name failed: $($_.Exception.Message)"
    }
}

function Invoke-Native([string]$Exe, [string[]]$Arguments) {
    # Windows PowerShell 5.1 turns native stderr into errors under 'Stop'; collect it
    $out = & { $ErrorActionPreference = 'Continue'; & $Exe @Arguments 2>&1 }
    [pscustomobject]@{ Code = $LASTEXITCODE; Output = (@($out) | ForEach-Object { [string]$_ }) -join "`n" }
}

$SID_ADMINS = 'S-1-5-32-544'   # BUILTIN\Administrators; SIDs, not names: names are localised
$SID_SYSTEM = 'S-1-5-18'

# 1. ---------------------------------------------------------------- secrets
Invoke-Step 'remove-autologon-secrets' {
    $wl = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'
    Set-ItemProperty -Path $wl -Name AutoAdminLogon -Value '0'
    foreach ($n in 'DefaultPassword', 'AutoLogonCount') {
        Remove-ItemProperty -Path $wl -Name $n -ErrorAction SilentlyContinue
    }
    $removed = @()
    foreach ($f in "$env:SystemRoot\Panther\unattend.xml", "$env:SystemRoot\Panther\Unattend\unattend.xml",
                   "$env:SystemRoot\Panther\Unattend\autounattend.xml", "$env:SystemRoot\System32\Sysprep\unattend.xml") {
        if (Test-Path -LiteralPath $f) { Remove-Item -LiteralPath $f -Force; $removed += $f }
    }
    "removed: $($removed -join ', ')"
}

# 2. ---------------------------------------------------------------- OpenSSH
# learn.microsoft.com/windows-server/administration/openssh/openssh_install_firstuse
# learn.microsoft.com/windows-server/administration/openssh/openssh_keymanagement
#   (administrators_authorized_keys; icacls /inheritance:r /grant Administrators:F /grant SYSTEM:F)
Invoke-Step 'openssh-server' {
    $cap = Get-WindowsCapability -Online | Where-Object Name -like 'OpenSSH.Server*' | Select-Object -First 1
    if ($null -eq $cap) { throw 'OpenSSH.Server capability not offered by this Windows' }
    if ($cap.State -ne 'Installed') {
        # needs Windows Update or Features-on-Demand media; Windows 11 24H2 and Server 2025 have it in-box
        Add-WindowsCapability -Online -Name $cap.Name | Out-Null
    }
    Set-Service -Name sshd -StartupType Automatic
    Start-Service -Name sshd
    'installed'
}

Invoke-Step 'ssh-authorized-key' {
    $keyFile = Join-Path $Drive $config.ssh_public_key_file
    if (-not (Test-Path -LiteralPath $keyFile)) { throw "no public key file $keyFile" }
    $key = (Get-Content -LiteralPath $keyFile -Raw).Trim()
    $sshDir = Join-Path $env:ProgramData 'ssh'
    New-Item -ItemType Directory -Force -Path $sshDir | Out-Null
    $ak = Join-Path $sshDir 'administrators_authorized_keys'
    $lines = @()
    if (Test-Path -LiteralPath $ak) { $lines = @(Get-Content -LiteralPath $ak | Where-Object { $_.Trim() }) }
    if ($lines -notcontains $key) { $lines += $key }
    [IO.File]::WriteAllText($ak, (($lines -join "`n") + "`n"), $utf8)
    $r = Invoke-Native 'icacls.exe' @($ak, '/inheritance:r', '/grant', "*${SID_ADMINS}:F", '/grant', "*${SID_SYSTEM}:F")
    if ($r.Code -ne 0) { throw "icacls failed: $($r.Output)" }
    "keys: $($lines.Count)"
}

# 3. ---------------------------------------------------------------- WinRM over HTTPS
# learn.microsoft.com/troubleshoot/windows-client/system-management-components/configure-winrm-for-https
# New-SelfSignedCertificate (pki module), New-Item WSMan:\localhost\Listener -Transport HTTPS
Invoke-Step 'winrm-https' {
    Set-Service -Name WinRM -StartupType Automatic
    Start-Service -Name WinRM
    $cert = Get-ChildItem Cert:\LocalMachine\My | Where-Object FriendlyName -eq 'rebalab-winrm' |
        Where-Object { $_.NotAfter -gt (Get-Date).AddDays(30) } | Select-Object -First 1
    if ($null -eq $cert) {
        $san = "2.5.29.17={text}DNS=localhost&DNS=$($env:COMPUTERNAME)&IPAddress=127.0.0.1"
        $cert = New-SelfSignedCertificate -Subject "CN=$($env:COMPUTERNAME)" -TextExtension @($san) `
            -FriendlyName 'rebalab-winrm' -CertStoreLocation Cert:\LocalMachine\My `
            -KeyAlgorithm RSA -KeyLength 3072 -KeyExportPolicy NonExportable -NotAfter (Get-Date).AddYears(10)
    }
    Get-ChildItem WSMan:\localhost\Listener | Where-Object { $_.Keys -contains 'Transport=HTTPS' } |
        Remove-Item -Recurse -Force
    New-Item -Path WSMan:\localhost\Listener -Transport HTTPS -Address * -CertificateThumbPrint $cert.Thumbprint -Force | Out-Null
    # remote UAC: a local (non built-in) administrator gets a full token over WinRM only with this
    New-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Policies\System' `
        -Name LocalAccountTokenFilterPolicy -PropertyType DWord -Value 1 -Force | Out-Null
    $pem = "-----BEGIN CERTIFICATE-----`n" + [Convert]::ToBase64String($cert.RawData, 'InsertLineBreaks') + "`n-----END CERTIFICATE-----`n"
    [IO.File]::WriteAllText((Join-Path $Drive 'winrm-cert.pem'), $pem.Replace("`r`n", "`n"), $utf8)
    $facts['winrm_thumbprint'] = $cert.Thumbprint
    $facts['winrm_port'] = 5986
    $cert.Thumbprint
}

# 4. ---------------------------------------------------------------- firewall
Invoke-Step 'firewall' {
    foreach ($rule in @(@{ Name = 'rebalab-ssh'; Port = 22 }, @{ Name = 'rebalab-winrm-https'; Port = 5986 })) {
        Get-NetFirewallRule -Name $rule.Name -ErrorAction SilentlyContinue | Remove-NetFirewallRule
        New-NetFirewallRule -Name $rule.Name -DisplayName $rule.Name -Direction Inbound -Protocol TCP `
            -LocalPort $rule.Port -Action Allow -Profile Any | Out-Null
    }
    # nothing else of ours listens; WinRM over HTTP stays closed
    Get-NetFirewallRule -Name 'WINRM-HTTP-In-TCP*' -ErrorAction SilentlyContinue | Disable-NetFirewallRule
    'tcp 22, 5986'
}

# 5. ---------------------------------------------------------------- test signing
# learn.microsoft.com/windows-hardware/drivers/install/the-testsigning-boot-configuration-option
Invoke-Step 'testsigning' {
    $r = Invoke-Native 'bcdedit.exe' @('/set', 'testsigning', 'on')
    if ($r.Code -ne 0) { throw "bcdedit failed ($($r.Code)): $($r.Output) (Secure Boot must be off)" }
    'on (after reboot)'
}

# 6. ---------------------------------------------------------------- crash dumps
# HKLM\SYSTEM\CurrentControlSet\Control\CrashControl (Win32_OSRecoveryConfiguration maps it):
# CrashDumpEnabled 2 = kernel memory dump
Invoke-Step 'crash-dump' {
    $cc = 'HKLM:\SYSTEM\CurrentControlSet\Control\CrashControl'
    $values = [ordered]@{ CrashDumpEnabled = 2; AutoReboot = 1; Overwrite = 1; AlwaysKeepMemoryDump = 1; LogEvent = 1 }
    foreach ($k in $values.Keys) { New-ItemProperty -Path $cc -Name $k -PropertyType DWord -Value $values[$k] -Force | Out-Null }
    New-ItemProperty -Path $cc -Name DumpFile -PropertyType ExpandString -Value '%SystemRoot%\MEMORY.DMP' -Force | Out-Null
    New-ItemProperty -Path $cc -Name MinidumpDir -PropertyType ExpandString -Value '%SystemRoot%\Minidump' -Force | Out-Null
    'kernel dump'
}

# 7. ---------------------------------------------------------------- Kernel-PnP AutoLogger
# learn.microsoft.com/windows/win32/etw/configuring-and-starting-an-autologger-session
Invoke-Step 'kernel-pnp-autologger' {
    $key = 'HKLM:\SYSTEM\CurrentControlSet\Control\WMI\Autologger\rebalab-kernel-pnp'
    New-Item -Path $key -Force | Out-Null
    New-Item -ItemType Directory -Force -Path 'C:\rebalab\trace' | Out-Null
    New-ItemProperty -Path $key -Name Start -PropertyType DWord -Value 1 -Force | Out-Null
    New-ItemProperty -Path $key -Name Guid -PropertyType String -Value '{6A1C0B5E-3F0D-4C52-9E57-7B0A1E5C2D41}' -Force | Out-Null
    New-ItemProperty -Path $key -Name FileName -PropertyType String -Value 'C:\rebalab\trace\boot-kernel-pnp.etl' -Force | Out-Null
    New-ItemProperty -Path $key -Name MaxFileSize -PropertyType DWord -Value 64 -Force | Out-Null
    New-ItemProperty -Path $key -Name BufferSize -PropertyType DWord -Value 64 -Force | Out-Null
    $prov = Join-Path $key '{9C205A39-1250-487D-ABD7-E831C6290539}'
    New-Item -Path $prov -Force | Out-Null
    New-ItemProperty -Path $prov -Name Enabled -PropertyType DWord -Value 1 -Force | Out-Null
    New-ItemProperty -Path $prov -Name EnableLevel -PropertyType DWord -Value 5 -Force | Out-Null
    New-ItemProperty -Path $prov -Name MatchAnyKeyword -PropertyType QWord -Value ([int64]-1) -Force | Out-Null
    'rebalab-kernel-pnp'
}

# 8. ---------------------------------------------------------------- SetupAPI logging
# learn.microsoft.com/windows-hardware/drivers/install/setting-the-event-level-for-a-text-log
# LogLevel 0xUUUUGHVW: GH = 0x60 -> device log at TXTLOG_VERBOSE (6); VW = 0 -> app log default
Invoke-Step 'setupapi-loglevel' {
    New-ItemProperty -Path 'HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup' -Name LogLevel `
        -PropertyType DWord -Value 0x00006000 -Force | Out-Null
    '0x00006000'
}

# 9. ---------------------------------------------------------------- driver under test
# learn.microsoft.com/windows-hardware/drivers/devtest/pnputil-command-syntax
#   PNPUTIL /add-driver <filename.inf | *.inf> [/subdirs] [/install] [/reboot]
$manifest = [ordered]@{ schema = 1; driver = $null }
if ($config.driver_dir) {
    Invoke-Step 'driver' {
        $src = Join-Path $Drive $config.driver_dir
        $dst = 'C:\rebalab\driver'
        New-Item -ItemType Directory -Force -Path $dst | Out-Null
        Copy-Item -Path (Join-Path $src '*') -Destination $dst -Recurse -Force
        $certs = @()
        foreach ($c in @(Get-ChildItem -LiteralPath $dst -Recurse -Include *.cer)) {
            foreach ($store in 'Root', 'TrustedPublisher') {
                Import-Certificate -FilePath $c.FullName -CertStoreLocation "Cert:\LocalMachine\$store" | Out-Null
            }
            $certs += $c.Name
        }
        $r = Invoke-Native 'pnputil.exe' @('/add-driver', (Join-Path $dst '*.inf'), '/subdirs', '/install')
        # PnPUtil return values, learn.microsoft.com/windows-hardware/drivers/devtest/pnputil-return-values:
        #   0    ERROR_SUCCESS
        #   259  ERROR_NO_MORE_ITEMS: no device matches the driver (or it already has a better
        #        one). The install VM has no virtual device under test, so this is the normal
        #        outcome here: the package is staged in the driver store, nothing installed;
        #        the lab's first boot with the device checks that it binds.
        #   3010 ERROR_SUCCESS_REBOOT_REQUIRED
        # (1641, reboot initiated, needs /reboot, which is not passed.) lab/windows/driver_check.py
        # holds the same table; tests/unit/test_windows_driver_install.py keeps them equal.
        $PnputilOutcome = @{ 0 = 'installed'; 259 = 'staged-no-device'; 3010 = 'installed-reboot-required' }
        # the oemNN.inf names the packages were published as (what DEVPKEY_Device_DriverInfPath
        # of a bound device shows), from the DISM module: Get-WindowsDriver -Online lists
        # third-party packages with Driver (oemNN.inf) and OriginalFileName (the INF's path
        # in the driver store); learn.microsoft.com/powershell/module/dism/get-windowsdriver
        $infs = @(Get-ChildItem -LiteralPath $dst -Recurse -Filter *.inf | ForEach-Object { $_.Name.ToLowerInvariant() })
        $published = @()
        try {
            foreach ($d in @(Get-WindowsDriver -Online)) {
                $leaf = [IO.Path]::GetFileName([string]$d.OriginalFileName).ToLowerInvariant()
                if ($infs -contains $leaf) { $published += [ordered]@{ inf = $leaf; published_name = [string]$d.Driver } }
            }
        } catch { Write-Warning "Get-WindowsDriver failed: $($_.Exception.Message)" }
        $status = if ($PnputilOutcome.ContainsKey([int]$r.Code)) { $PnputilOutcome[[int]$r.Code] } else { 'failed' }
        $manifest['driver'] = [ordered]@{
            source = $config.driver_dir; copied_to = $dst; certificates = $certs
            pnputil_exit_code = $r.Code; pnputil_output = $r.Output; status = $status
            infs = $infs; published = $published
        }
        if ($status -eq 'failed') { throw "pnputil exit code $($r.Code)" }
        "pnputil $($r.Code) ($status)"
    }
}

# 9b. --------------------------------------------------------------- WDTF runtime
# learn.microsoft.com/windows-hardware/drivers/wdtf/wdtf-runtime-library: the WDTF
# installation files (*.msi, *.cab) of the test computer's architecture come from the
# WDK's Windows Kits\10\Testing\Runtimes and are installed with msiexec /i.
# learn.microsoft.com/windows-server/administration/windows-commands/msiexec: /qn (no UI),
# /norestart, /l*v LOGFILE (verbose log). Msiexec's exit status is a system error code
# (learn.microsoft.com/windows/win32/msi/command-line-options): 0 success,
# 3010 ERROR_SUCCESS_REBOOT_REQUIRED (the build's final shutdown completes it).
# The check at the end creates the WDTF aggregation object the lab uses
# (lab/windows/wdtf.py tries the same progids).
if ($config.wdtf_dir) {
    Invoke-Step 'wdtf' {
        $src = Join-Path $Drive $config.wdtf_dir
        $dst = 'C:\rebalab\wdtf'
        New-Item -ItemType Directory -Force -Path $dst | Out-Null
        Copy-Item -Path (Join-Path $src '*') -Destination $dst -Recurse -Force
        $msis = @(Get-ChildItem -LiteralPath $dst -Filter *.msi | Where-Object { $_.Name -like '*WDTF*' } |
            Sort-Object -Property Name)
        $installed = @()
        $wdtfResult = [ordered]@{ msis = @(); com_ok = $false; progid = $null; error = $null }
        $manifest['wdtf'] = $wdtfResult
        if ($msis.Count -eq 0) { $wdtfResult.error = 'no *WDTF*.msi in the --wdtf folder'; throw $wdtfResult.error }
        foreach ($m in $msis) {
            $log = Join-Path $dst ($m.BaseName + '.install.log')
            $proc = Start-Process -FilePath 'msiexec.exe' -Wait -PassThru -ArgumentList @(
                '/i', ('"{0}"' -f $m.FullName), '/qn', '/norestart', '/l*v', ('"{0}"' -f $log))
            $wdtfResult.msis += [ordered]@{ msi = $m.Name; exit_code = $proc.ExitCode; log = $log }
            if (@(0, 3010) -notcontains [int]$proc.ExitCode) {
                $wdtfResult.error = "msiexec $($m.Name) exit code $($proc.ExitCode) (log $log)"
                throw $wdtfResult.error
            }
            $installed += $m.Name
        }
        foreach ($progId in @('WDTF2.WDTF', 'WDTF.WDTF')) {
            try { $null = New-Object -ComObject $progId; $wdtfResult.com_ok = $true; $wdtfResult.progid = $progId; break }
            catch { $wdtfResult.error = "New-Object -ComObject ${progId}: $($_.Exception.Message)" }
        }
        if (-not $wdtfResult.com_ok) { throw $wdtfResult.error }
        $wdtfResult.error = $null
        "installed $($installed -join ', '); COM $($wdtfResult.progid)"
    }
}

# 10. --------------------------------------------------------------- facts
Invoke-Step 'facts' {
    $os = Get-CimInstance Win32_OperatingSystem
    $cv = Get-ItemProperty 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion'
    $facts['edition'] = [string]$os.Caption
    $facts['edition_id'] = [string]$cv.EditionID
    $facts['version'] = [string]$os.Version
    $facts['build'] = [string]$os.BuildNumber
    $facts['ubr'] = [int]$cv.UBR
    $facts['display_version'] = [string]$cv.DisplayVersion
    $facts['computer_name'] = $env:COMPUTERNAME
    $facts['powershell'] = $PSVersionTable.PSVersion.ToString()
    $hostKey = Join-Path $env:ProgramData 'ssh\ssh_host_ed25519_key.pub'
    if (Test-Path -LiteralPath $hostKey) {
        $facts['ssh_host_key'] = (Get-Content -LiteralPath $hostKey -Raw).Trim()
        $kg = Join-Path $env:SystemRoot 'System32\OpenSSH\ssh-keygen.exe'
        if (Test-Path -LiteralPath $kg) {
            $r = Invoke-Native $kg @('-l', '-f', $hostKey)
            if ($r.Code -eq 0) { $facts['ssh_host_key_fingerprint'] = ($r.Output -split '\s+')[1] }
        }
    }
    'collected'
}

$facts['steps'] = $results
# OpenSSH may be unavailable offline (Features on Demand); WinRM alone is enough for the lab
$optional = @('openssh-server', 'ssh-authorized-key')
$failed = @($results.Keys | Where-Object { -not $results[$_].ok -and $optional -notcontains $_ })
$facts['failed_steps'] = $failed
$facts['ok'] = ($failed.Count -eq 0)
$facts['finished_utc'] = [DateTime]::UtcNow.ToString('o')
[IO.File]::WriteAllText((Join-Path $Drive 'manifest.json'), ($manifest | ConvertTo-Json -Depth 6), $utf8)
[IO.File]::WriteAllText((Join-Path $Drive 'facts.json'), ($facts | ConvertTo-Json -Depth 6), $utf8)
Stop-Transcript | Out-Null

# 11. --------------------------------------------------------------- power off
if (-not $config.no_shutdown) {
    & shutdown.exe /s /t 5 /f /d p:4:1
}
