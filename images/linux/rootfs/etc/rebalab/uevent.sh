#!/bin/sh
# Run by busybox `uevent` for every kernel uevent (netlink), one at a time, in order.
# PCI and sound uevents become kernel log lines "rebalab-uevent KEY=VALUE ..." so they reach
# the host on the console with the guest's printk timestamp, and /run/rebalab/bound/<BDF>
# exists exactly while a PCI driver is bound. "bind" is sent by the driver core after the
# driver's probe() returned 0 (driver_bound()), whereas the sysfs `driver` link appears
# before probe() runs: the lab's "bound" means the bind uevent.
case "$SUBSYSTEM" in
    pci|sound) ;;
    *) exit 0 ;;
esac
printf '<6>rebalab-uevent ACTION=%s SUBSYSTEM=%s DEVPATH=%s DRIVER=%s SEQNUM=%s\n' \
    "$ACTION" "$SUBSYSTEM" "$DEVPATH" "${DRIVER:--}" "$SEQNUM" > /dev/kmsg
if [ "$SUBSYSTEM" = pci ]; then
    name=${DEVPATH##*/}
    case "$ACTION" in
        bind) echo "$DRIVER" > "/run/rebalab/bound/$name" ;;
        unbind|remove) rm -f "/run/rebalab/bound/$name" ;;
    esac
fi
exit 0
