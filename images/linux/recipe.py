"""What goes into the rebalab Linux guest.  Data only: build.py does the work.

Every file in images/linux/ (this one included) is part of the image's input
hash, so editing the recipe triggers a rebuild.
"""

# The kernel: this meta package's dependency names the ABI-specific image package
# (linux-image-amd64 -> linux-image-6.1.0-NN-amd64).
KERNEL_META_PACKAGE = "linux-image-amd64"

# Kernel modules to include, with their dependencies (resolved by modprobe --show-depends).
# The guest loads them on demand by modalias (coldplug at boot, mdev for hot-plug).
MODULES = [
    "virtio_pci",
    "virtio_net",
    "e1000",
    "snd_hda_intel",
    "snd_hda_codec_generic",  # QEMU's hda-duplex/hda-output/hda-micro codecs bind to the generic parser
    "snd_intel8x0",  # AC97
    "snd_ens1370",  # ES1370
    "virtio_rng",  # with -device virtio-rng-pci the CRNG is ready early (see README: boot time)
]

# busybox: /bin/busybox with one symlink per applet.
BUSYBOX_PACKAGE = "busybox-static"

# Programs (package, path in the package); their shared libraries are found by
# reading DT_NEEDED and taken from downloaded packages.
PROGRAMS = [
    # OpenSSH's server, not dropbear: Debian 12's dropbear 2022.83-1+deb12u3 can close a
    # session channel before its exec request arrives, then hits "Failed assertion
    # (common-channel.c:705): '!channel->sent_close'" and drops the whole connection
    # (fixed upstream in 2024.86 only; README.md: "The SSH server"). OpenSSH is also the
    # server family Windows guests run.
    ("openssh-server", "/usr/sbin/sshd"),
    ("openssh-sftp-server", "/usr/lib/openssh/sftp-server"),  # sshd_config's sftp subsystem
    ("alsa-utils", "/usr/bin/aplay"),
    ("alsa-utils", "/usr/bin/amixer"),
    ("pciutils", "/usr/bin/lspci"),
    ("pciutils", "/usr/bin/setpci"),
]

# The guest's own key generator, run on the build host through the guest's loader and
# libraries to make the image's keys (OpenSSH format). Never copied into the image.
# Python makes them instead with --python-keys or when it cannot run here.
KEYGEN = ("openssh-client", "/usr/bin/ssh-keygen")

# Plain files or directories (package, path).
DATA = [
    ("libasound2-data", "/usr/share/alsa"),  # alsa.conf, cards/, pcm/
    ("pci.ids", "/usr/share/misc/pci.ids"),  # names for lspci
]

# Kernel command line the lab should use (it appends its own options).
#  console=ttyS0,115200  kernel log and init output on the first serial port
#  panic=-1              reboot at once on panic (with QEMU -no-reboot: QEMU exits)
#  printk.devkmsg=on     no rate limit on /dev/kmsg writes (the ttyS1 sync responder)
#  printk.time=1         timestamps on every kernel log line
#  quiet                 quiet boot (~0.5 s faster under TCG); init raises the console log level
CMDLINE = "console=ttyS0,115200 panic=-1 printk.devkmsg=on printk.time=1 quiet"

# Printed (as a kernel log line, so it is never torn by other console output)
# when the guest is ready: network up and the SSH server (sshd) listening.
READY_MARKER = "REBALAB-READY"
# Printed instead when init hit something it cannot recover from; the reason follows on the same line.
FAILED_MARKER = "REBALAB-FAILED"

# Guest network (QEMU user networking defaults: guest 10.0.2.15, gateway 10.0.2.2).
GUEST_IP = "10.0.2.15"
GUEST_PREFIX = 24
GATEWAY = "10.0.2.2"
SSH_PORT = 22
SSH_USER = "root"

# Console log level init sets (kernel messages of this level and more urgent reach ttyS0).
CONSOLE_LOGLEVEL = 7

# Out-of-tree modules: if images/linux/testdrv/ has a Makefile or Kbuild, it is built
# against the kernel's headers and installed under /lib/modules/<release>/extra/.
TESTDRV_DIR = "testdrv"
