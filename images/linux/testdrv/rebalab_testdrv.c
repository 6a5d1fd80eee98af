// SPDX-License-Identifier: GPL-2.0
/*
 * rebalab_testdrv: a PCI driver for QEMU's "edu" device (1234:11e8) with bugs planted on
 * request, so that rebalab's race hunt (hot-unplug, forced rebalance) runs against real
 * kernel code.
 *
 * Each bound device gets a character device /dev/rebalab_testdrv<N>.  Every read() of at
 * least 16 bytes runs one DMA transfer on the device (even sequence numbers RAM->device,
 * odd ones device->RAM, reading back what the previous one wrote), waits for its
 * completion interrupt and returns one 16-byte record (struct rebalab_testdrv_rec).
 * QEMU completes an edu DMA from a timer 100 ms (virtual clock) after the command, so a
 * reader loop keeps a transfer in flight most of the time.
 *
 * Module parameters (all writable at run time; a device keeps the bug mode it was probed with):
 *   bug=none         correct: remove() takes the driver lock (so it waits for the transfer in
 *                    flight, <= ~100 ms), marks the device gone (new reads fail with -ENODEV),
 *                    then frees the IRQ, unmaps the BAR and frees the DMA buffer.
 *   bug=no-drain     remove() marks the device gone without taking the lock, tears everything
 *                    down and only then wakes the reader waiting for its DMA; the reader reads
 *                    the DMA command register through the unmapped BAR -> "BUG: unable to
 *                    handle page fault" oops right after remove().  Harmless when no transfer
 *                    is in flight, or when the completion IRQ beat the teardown (a race).
 *   bug=slow-remove  correct, but remove() holds the driver lock for slow_ms ms (msleep) while
 *                    readers block on it: a remove-duration violation, not a crash.
 *   bug=stale-bar    BAR0's address from the module's first probe is kept in a static and
 *                    ioremap()ed on every later probe: once a rebalance moved the BAR, the
 *                    driver talks to a window nothing decodes (QEMU 7.2 reads 0 there, real
 *                    hardware all ones): "unexpected ident" at probe, every read times out.
 *   slow_ms=200      how long slow-remove holds the lock.
 *   timeout_ms=1000  how long a read waits for the DMA completion interrupt.
 *
 * Log lines (all "rebalab_testdrv <BDF>: ..."; none per transfer):
 *   probe: bug=<mode> BAR0 <phys>+<len> mapped <phys> ident <x> live <ok|BAD> irq <n> (<MSI|INTx>) dev /dev/<name>
 *   unexpected ident <x> (expected 0x010000ed) at <phys> (BAR0 is at <phys>)
 *   stream start (pid <n> <comm>)
 *   stream stop: <n> transfers, <n> errors in <n> ms, DMA latency min/avg/max <a>/<b>/<c> us
 *   DMA timeout after <n> ms (cmd <x> irq status <x>)        (first one of a stream only)
 *   remove: bug=<mode> in flight=<0|1> ...
 *   remove: done in <n> us (bug=<mode>)
 *
 * The module has a device table (so it binds any edu device once loaded), but the image
 * blacklists it (/etc/modprobe.d/rebalab-testdrv.conf): plugging an edu device never loads
 * it by alias; a scenario loads it with "modprobe rebalab_testdrv bug=<mode>".
 *
 * rebalab_testdrv_probe() and rebalab_testdrv_remove() are looked up by name by the lab's
 * kprobe tracer: keep the names, keep them out of line.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/delay.h>
#include <linux/dma-mapping.h>
#include <linux/fs.h>
#include <linux/idr.h>
#include <linux/interrupt.h>
#include <linux/io.h>
#include <linux/kernel.h>
#include <linux/kref.h>
#include <linux/ktime.h>
#include <linux/miscdevice.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/pci.h>
#include <linux/sched.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/wait.h>
#include <linux/workqueue.h>
#include <asm/tlbflush.h>

#define DRV_NAME		"rebalab_testdrv"

/* QEMU hw/misc/edu.c, docs/specs/edu.txt */
#define EDU_VENDOR		0x1234
#define EDU_DEVICE		0x11e8
#define EDU_REG_IDENT		0x00	/* 0x010000ed: major 1, minor 0, 0xed */
#define EDU_REG_LIVENESS	0x04	/* reads back ~written */
#define EDU_REG_STATUS		0x20
#define EDU_REG_IRQ_STATUS	0x24
#define EDU_REG_IRQ_RAISE	0x60
#define EDU_REG_IRQ_ACK		0x64
#define EDU_REG_DMA_SRC		0x80
#define EDU_REG_DMA_DST		0x88
#define EDU_REG_DMA_CNT		0x90
#define EDU_REG_DMA_CMD		0x98
#define EDU_IDENT		0x010000ed
#define EDU_IRQ_FACT		0x00000001
#define EDU_IRQ_DMA		0x00000100
#define EDU_DMA_RUN		0x1
#define EDU_DMA_TO_RAM		0x2	/* direction bit: 0 = RAM -> device, 1 = device -> RAM */
#define EDU_DMA_IRQ		0x4
#define EDU_DMA_BUF		0x40000	/* the device's 4 KiB DMA buffer, in its DMA address space */
#define EDU_DMA_MASK_BITS	28	/* edu's default dma_mask property */
/* QEMU 7.2 aborts (hw_error) on a transfer outside [EDU_DMA_BUF, +4K): stay well inside */
#define XFER_BYTES		8
#define RAM_BUF_SIZE		PAGE_SIZE
#define RAM_OFF_OUT		0	/* what we send to the device */
#define RAM_OFF_IN		64	/* where the device writes back */

enum tdrv_bug { BUG_NONE, BUG_NO_DRAIN, BUG_SLOW_REMOVE, BUG_STALE_BAR, BUG_COUNT };

static const char *const bug_names[BUG_COUNT] = {
	[BUG_NONE] = "none",
	[BUG_NO_DRAIN] = "no-drain",
	[BUG_SLOW_REMOVE] = "slow-remove",
	[BUG_STALE_BAR] = "stale-bar",
};

static int bug_mode = BUG_NONE;
static int slow_ms = 200;
static int timeout_ms = 1000;

static int bug_set(const char *val, const struct kernel_param *kp)
{
	char buf[16];
	int i;

	strscpy(buf, val, sizeof(buf));
	strim(buf);
	for (i = 0; buf[i]; i++)
		if (buf[i] == '_')
			buf[i] = '-';
	for (i = 0; i < BUG_COUNT; i++) {
		if (!strcmp(buf, bug_names[i])) {
			WRITE_ONCE(bug_mode, i);
			return 0;
		}
	}
	pr_err("unknown bug mode '%s' (none, no-drain, slow-remove, stale-bar)\n", buf);
	return -EINVAL;
}

static int bug_get(char *buffer, const struct kernel_param *kp)
{
	return scnprintf(buffer, PAGE_SIZE, "%s\n", bug_names[READ_ONCE(bug_mode)]);
}

static const struct kernel_param_ops bug_ops = {
	.set = bug_set,
	.get = bug_get,
};

module_param_cb(bug, &bug_ops, NULL, 0644);
__MODULE_PARM_TYPE(bug, "string");
MODULE_PARM_DESC(bug, "planted bug: none (default), no-drain, slow-remove, stale-bar; "
		 "read at probe time");
module_param(slow_ms, int, 0644);
MODULE_PARM_DESC(slow_ms, "slow-remove: how long remove() holds the driver lock, ms (default 200)");
module_param(timeout_ms, int, 0644);
MODULE_PARM_DESC(timeout_ms, "how long a read waits for the DMA completion interrupt, ms (default 1000)");

/* stale-bar: BAR0's address as the first probe saw it (the planted bug). */
static resource_size_t first_bar0;

static DEFINE_IDA(tdrv_ida);

/* What one read() returns; little-endian, 16 bytes. */
struct rebalab_testdrv_rec {
	__le32 seq;		/* transfer number on this device, from 0 */
	__le32 data;		/* the word sent (RAM->device) or read back (device->RAM) */
	__le32 latency_us;	/* command written -> completion seen by the reader */
	__le32 flags;		/* REC_* */
};
#define REC_TO_RAM	0x1	/* this transfer was device -> RAM */
#define REC_VERIFIED	0x2	/* device -> RAM: the word read back is the one sent last */

struct tdrv {
	struct kref ref;		/* remove() holds one, every open file one */
	struct pci_dev *pdev;		/* referenced (pci_dev_get) until the last ref goes */
	enum tdrv_bug bug;
	int minor_id;
	char name[32];
	struct miscdevice misc;

	void __iomem *bar;
	resource_size_t bar_phys;	/* the address actually mapped */
	bool stale_mapped;		/* bar is our own ioremap() of an old address (stale-bar) */
	int irq;
	void *buf;			/* coherent DMA buffer */
	dma_addr_t buf_dma;

	struct mutex lock;		/* one transfer at a time; remove() takes it to drain */
	bool gone;			/* set by remove(): no new transfers */
	bool busy;			/* a transfer is in flight */
	wait_queue_head_t wq;
	bool dma_done;			/* set by the IRQ handler */

	/* stream statistics, under lock */
	u32 seq;
	u32 last_sent;
	bool have_sent;
	bool streaming;
	bool timeout_logged;
	ktime_t stream_t0;
	u64 n_xfers, n_errors, lat_sum_us;
	u32 lat_min_us, lat_max_us;
	struct delayed_work idle_work;	/* "stream stop" after 1 s without a transfer */
	unsigned long n_irqs;
};

#define STREAM_IDLE_MS	1000

static void tdrv_release(struct kref *ref)
{
	struct tdrv *td = container_of(ref, struct tdrv, ref);

	cancel_delayed_work_sync(&td->idle_work);
	pci_dev_put(td->pdev);
	kfree(td);
}

/* Called with td->lock held (or from remove once nothing else can run). */
static void tdrv_stream_summary(struct tdrv *td, const char *why)
{
	u64 avg = td->n_xfers ? div64_u64(td->lat_sum_us, td->n_xfers) : 0;

	dev_info(&td->pdev->dev,
		 "stream stop%s: %llu transfers, %llu errors in %lld ms, DMA latency min/avg/max %u/%llu/%u us\n",
		 why, td->n_xfers, td->n_errors,
		 ktime_ms_delta(ktime_get(), td->stream_t0),
		 td->n_xfers ? td->lat_min_us : 0, avg, td->lat_max_us);
	td->streaming = false;
}

static void tdrv_idle_work(struct work_struct *work)
{
	struct tdrv *td = container_of(to_delayed_work(work), struct tdrv, idle_work);

	if (!mutex_trylock(&td->lock))
		return;		/* a transfer is running: not idle (and never block remove()) */
	if (td->streaming && !td->busy)
		tdrv_stream_summary(td, "");
	mutex_unlock(&td->lock);
}

/*
 * bug=no-drain: iounmap() clears the PTEs at once but flushes the TLB lazily, so on real
 * hardware (or KVM) a late access could still go through a stale TLB entry and hide the bug.
 * Flushing makes the late access fault everywhere.  (vm_unmap_aliases() would flush too,
 * but it also frees the virtual range for reuse: the next probe's ioremap() then gets the
 * same address and the late access silently hits the re-probed device instead.)
 */
static void tdrv_flush_tlb(void *unused)
{
	__flush_tlb_all();
}

static irqreturn_t tdrv_irq(int irq, void *data)
{
	struct tdrv *td = data;
	u32 st = ioread32(td->bar + EDU_REG_IRQ_STATUS);

	if (!st || st == ~0u)	/* not ours (shared INTx), or the device is gone */
		return IRQ_NONE;
	iowrite32(st, td->bar + EDU_REG_IRQ_ACK);
	td->n_irqs++;
	if (st & EDU_IRQ_DMA) {
		WRITE_ONCE(td->dma_done, true);
		wake_up(&td->wq);
	}
	return IRQ_HANDLED;
}

/* One DMA transfer; td->lock held.  Returns 0 or -errno and fills *rec. */
static noinline int tdrv_transfer(struct tdrv *td, struct rebalab_testdrv_rec *rec)
{
	u32 seq = td->seq++;
	bool to_ram = seq & 1;
	u32 *out = td->buf + RAM_OFF_OUT, *in = td->buf + RAM_OFF_IN;
	u32 cmd = EDU_DMA_RUN | EDU_DMA_IRQ, data, cmd_after, lat_us;
	ktime_t t0;
	long left;

	if (!td->streaming) {
		td->streaming = true;
		td->timeout_logged = false;
		td->stream_t0 = ktime_get();
		td->n_xfers = td->n_errors = td->lat_sum_us = 0;
		td->lat_min_us = U32_MAX;
		td->lat_max_us = 0;
		dev_info(&td->pdev->dev, "stream start (pid %d %s)\n", task_pid_nr(current), current->comm);
	}

	if (to_ram && !td->have_sent)
		to_ram = false;		/* nothing to read back yet */
	if (to_ram) {
		memset(in, 0, XFER_BYTES);
		iowrite32(EDU_DMA_BUF, td->bar + EDU_REG_DMA_SRC);
		iowrite32(td->buf_dma + RAM_OFF_IN, td->bar + EDU_REG_DMA_DST);
		cmd |= EDU_DMA_TO_RAM;
	} else {
		data = seq * 0x9e3779b9u ^ 0x5eb0a1ab;
		out[0] = data;
		out[1] = seq;
		iowrite32(td->buf_dma + RAM_OFF_OUT, td->bar + EDU_REG_DMA_SRC);
		iowrite32(EDU_DMA_BUF, td->bar + EDU_REG_DMA_DST);
	}
	iowrite32(XFER_BYTES, td->bar + EDU_REG_DMA_CNT);

	WRITE_ONCE(td->dma_done, false);
	WRITE_ONCE(td->busy, true);
	t0 = ktime_get();
	iowrite32(cmd, td->bar + EDU_REG_DMA_CMD);
	left = wait_event_timeout(td->wq, READ_ONCE(td->dma_done) || READ_ONCE(td->gone),
				  msecs_to_jiffies(READ_ONCE(timeout_ms)));
	lat_us = ktime_us_delta(ktime_get(), t0);
	/*
	 * The engine must be idle now.  With bug=no-drain, remove() unmapped the BAR while we
	 * slept and then woke us (gone): this read is the use-after-unmap that oopses.
	 */
	cmd_after = ioread32(td->bar + EDU_REG_DMA_CMD);
	WRITE_ONCE(td->busy, false);

	memset(rec, 0, sizeof(*rec));
	rec->seq = cpu_to_le32(seq);
	rec->latency_us = cpu_to_le32(lat_us);
	if (!left || (cmd_after & EDU_DMA_RUN)) {
		td->n_errors++;
		if (!td->timeout_logged) {
			td->timeout_logged = true;
			dev_warn(&td->pdev->dev, "DMA timeout after %u ms (cmd %#x irq status %#x)\n",
				 lat_us / 1000, cmd_after, ioread32(td->bar + EDU_REG_IRQ_STATUS));
		}
		return -ETIMEDOUT;
	}
	if (to_ram) {
		data = in[0];
		rec->flags = cpu_to_le32(REC_TO_RAM | (data == td->last_sent ? REC_VERIFIED : 0));
		if (data != td->last_sent)
			td->n_errors++;
	} else {
		td->last_sent = data;
		td->have_sent = true;
	}
	rec->data = cpu_to_le32(data);
	td->n_xfers++;
	td->lat_sum_us += lat_us;
	td->lat_min_us = min(td->lat_min_us, lat_us);
	td->lat_max_us = max(td->lat_max_us, lat_us);
	return 0;
}

static int tdrv_open(struct inode *inode, struct file *file)
{
	/* misc_open() set private_data to our miscdevice and holds misc_mtx: remove() cannot
	 * be past misc_deregister() yet, so the ref we take here is valid. */
	struct tdrv *td = container_of(file->private_data, struct tdrv, misc);

	kref_get(&td->ref);
	file->private_data = td;
	return stream_open(inode, file);
}

static int tdrv_release_file(struct inode *inode, struct file *file)
{
	struct tdrv *td = file->private_data;

	kref_put(&td->ref, tdrv_release);
	return 0;
}

static ssize_t tdrv_read(struct file *file, char __user *ubuf, size_t len, loff_t *ppos)
{
	struct tdrv *td = file->private_data;
	struct rebalab_testdrv_rec rec;
	int ret;

	if (len < sizeof(rec))
		return -EINVAL;
	if (mutex_lock_interruptible(&td->lock))
		return -ERESTARTSYS;
	if (READ_ONCE(td->gone)) {
		mutex_unlock(&td->lock);
		return -ENODEV;
	}
	ret = tdrv_transfer(td, &rec);
	if (!READ_ONCE(td->gone))
		mod_delayed_work(system_wq, &td->idle_work, msecs_to_jiffies(STREAM_IDLE_MS));
	mutex_unlock(&td->lock);
	if (ret)
		return ret;
	if (copy_to_user(ubuf, &rec, sizeof(rec)))
		return -EFAULT;
	return sizeof(rec);
}

static const struct file_operations tdrv_fops = {
	.owner = THIS_MODULE,
	.open = tdrv_open,
	.release = tdrv_release_file,
	.read = tdrv_read,
	.llseek = no_llseek,
};

static noinline int rebalab_testdrv_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	resource_size_t bar0 = pci_resource_start(pdev, 0), len = pci_resource_len(pdev, 0);
	u32 ident, probe_val, live;
	struct tdrv *td;
	int ret;

	td = kzalloc(sizeof(*td), GFP_KERNEL);
	if (!td)
		return -ENOMEM;
	kref_init(&td->ref);
	td->pdev = pci_dev_get(pdev);
	td->bug = READ_ONCE(bug_mode);
	td->minor_id = -1;
	mutex_init(&td->lock);
	init_waitqueue_head(&td->wq);
	INIT_DELAYED_WORK(&td->idle_work, tdrv_idle_work);

	ret = pci_enable_device(pdev);
	if (ret)
		goto err_put;
	ret = pci_request_regions(pdev, DRV_NAME);
	if (ret)
		goto err_disable;
	if (!(pci_resource_flags(pdev, 0) & IORESOURCE_MEM) || len < 0x100) {
		dev_err(&pdev->dev, "BAR0 is not a memory BAR of at least 256 bytes\n");
		ret = -ENODEV;
		goto err_regions;
	}

	td->bar_phys = bar0;
	if (!first_bar0)
		first_bar0 = bar0;
	if (td->bug == BUG_STALE_BAR && first_bar0 != bar0) {
		/* the planted bug: trust the address seen at the first probe */
		td->bar_phys = first_bar0;
		td->stale_mapped = true;
		td->bar = ioremap(first_bar0, len);
	} else {
		td->bar = pci_iomap(pdev, 0, 0);
	}
	if (!td->bar) {
		ret = -ENOMEM;
		goto err_regions;
	}

	ident = ioread32(td->bar + EDU_REG_IDENT);
	probe_val = (u32)get_random_u32() | 1;
	iowrite32(probe_val, td->bar + EDU_REG_LIVENESS);
	live = ioread32(td->bar + EDU_REG_LIVENESS);
	if (ident != EDU_IDENT)
		dev_warn(&pdev->dev, "unexpected ident %#010x (expected %#010x) at %pa (BAR0 is at %pa)\n",
			 ident, EDU_IDENT, &td->bar_phys, &bar0);

	ret = dma_set_mask_and_coherent(&pdev->dev, DMA_BIT_MASK(EDU_DMA_MASK_BITS));
	if (ret) {
		dev_err(&pdev->dev, "no usable %d-bit DMA\n", EDU_DMA_MASK_BITS);
		goto err_unmap;
	}
	td->buf = dma_alloc_coherent(&pdev->dev, RAM_BUF_SIZE, &td->buf_dma, GFP_KERNEL);
	if (!td->buf) {
		ret = -ENOMEM;
		goto err_unmap;
	}
	pci_set_master(pdev);

	/* A completion left over from an earlier binding (rebalance): ack it before INTx/MSI. */
	iowrite32(~0u, td->bar + EDU_REG_IRQ_ACK);
	ret = pci_alloc_irq_vectors(pdev, 1, 1, PCI_IRQ_MSI | PCI_IRQ_LEGACY);
	if (ret < 0) {
		dev_err(&pdev->dev, "no interrupt: %d\n", ret);
		goto err_dma;
	}
	td->irq = pci_irq_vector(pdev, 0);
	ret = request_irq(td->irq, tdrv_irq, IRQF_SHARED, DRV_NAME, td);
	if (ret) {
		dev_err(&pdev->dev, "request_irq(%d): %d\n", td->irq, ret);
		goto err_vectors;
	}

	ret = ida_alloc(&tdrv_ida, GFP_KERNEL);
	if (ret < 0)
		goto err_irq;
	td->minor_id = ret;
	snprintf(td->name, sizeof(td->name), DRV_NAME "%d", td->minor_id);
	td->misc.minor = MISC_DYNAMIC_MINOR;
	td->misc.name = td->name;
	td->misc.fops = &tdrv_fops;
	td->misc.parent = &pdev->dev;
	td->misc.mode = 0600;
	pci_set_drvdata(pdev, td);
	ret = misc_register(&td->misc);
	if (ret) {
		dev_err(&pdev->dev, "misc_register: %d\n", ret);
		goto err_ida;
	}

	dev_info(&pdev->dev, "probe: bug=%s BAR0 %pa+%#llx mapped %pa ident %#010x live %s irq %d (%s) dev /dev/%s\n",
		 bug_names[td->bug], &bar0, (unsigned long long)len, &td->bar_phys, ident,
		 live == ~probe_val ? "ok" : "BAD", td->irq, pdev->msi_enabled ? "MSI" : "INTx", td->name);
	return 0;

err_ida:
	pci_set_drvdata(pdev, NULL);
	ida_free(&tdrv_ida, td->minor_id);
err_irq:
	free_irq(td->irq, td);
err_vectors:
	pci_free_irq_vectors(pdev);
err_dma:
	pci_clear_master(pdev);
	dma_free_coherent(&pdev->dev, RAM_BUF_SIZE, td->buf, td->buf_dma);
err_unmap:
	if (td->stale_mapped)
		iounmap(td->bar);
	else
		pci_iounmap(pdev, td->bar);
err_regions:
	pci_release_regions(pdev);
err_disable:
	pci_disable_device(pdev);
err_put:
	kref_put(&td->ref, tdrv_release);
	return ret;
}

static noinline void rebalab_testdrv_remove(struct pci_dev *pdev)
{
	struct tdrv *td = pci_get_drvdata(pdev);
	ktime_t t0 = ktime_get(), t1;
	bool in_flight = READ_ONCE(td->busy);
	int slow = READ_ONCE(slow_ms);

	switch (td->bug) {
	case BUG_NO_DRAIN:
		/* the planted bug: new reads fail, but the transfer in flight is not waited for */
		WRITE_ONCE(td->gone, true);
		dev_info(&pdev->dev, "remove: bug=no-drain in flight=%d: not waiting for it\n", in_flight);
		break;
	case BUG_SLOW_REMOVE:
		mutex_lock(&td->lock);		/* waits for the transfer in flight */
		t1 = ktime_get();
		WRITE_ONCE(td->gone, true);
		dev_info(&pdev->dev, "remove: bug=slow-remove in flight=%d waited %lld ms, holding the lock for %d ms\n",
			 in_flight, ktime_ms_delta(t1, t0), slow);
		msleep(max(slow, 0));		/* the planted bug: readers block on the lock meanwhile */
		if (td->streaming)
			tdrv_stream_summary(td, " (device removed)");
		mutex_unlock(&td->lock);
		break;
	default:
		mutex_lock(&td->lock);		/* waits for the transfer in flight */
		WRITE_ONCE(td->gone, true);
		dev_info(&pdev->dev, "remove: bug=%s in flight=%d waited %lld ms\n",
			 bug_names[td->bug], in_flight, ktime_ms_delta(ktime_get(), t0));
		if (td->streaming)
			tdrv_stream_summary(td, " (device removed)");
		mutex_unlock(&td->lock);
		break;
	}
	misc_deregister(&td->misc);		/* no new opens; open files keep td alive */
	cancel_delayed_work_sync(&td->idle_work);

	free_irq(td->irq, td);
	pci_free_irq_vectors(pdev);
	iowrite32(~0u, td->bar + EDU_REG_IRQ_ACK);
	pci_clear_master(pdev);
	if (td->stale_mapped)
		iounmap(td->bar);
	else
		pci_iounmap(pdev, td->bar);
	if (td->bug == BUG_NO_DRAIN)
		on_each_cpu(tdrv_flush_tlb, NULL, 1);
	/* td->bar and td->buf keep their stale values: with bug=no-drain a late reader uses them */
	dma_free_coherent(&pdev->dev, RAM_BUF_SIZE, td->buf, td->buf_dma);
	pci_release_regions(pdev);
	pci_disable_device(pdev);
	pci_set_drvdata(pdev, NULL);
	ida_free(&tdrv_ida, td->minor_id);
	/*
	 * Readers wait for "DMA done or device gone".  In the correct modes none is waiting
	 * any more (remove() took the lock); with bug=no-drain this wakes the one in flight,
	 * after everything it is about to touch is gone.
	 */
	wake_up_all(&td->wq);

	dev_info(&pdev->dev, "remove: done in %lld us (bug=%s, %lu irqs)\n",
		 ktime_us_delta(ktime_get(), t0), bug_names[td->bug], td->n_irqs);
	kref_put(&td->ref, tdrv_release);
}

static const struct pci_device_id tdrv_ids[] = {
	{ PCI_DEVICE(EDU_VENDOR, EDU_DEVICE) },
	{ 0 }
};
MODULE_DEVICE_TABLE(pci, tdrv_ids);

static struct pci_driver tdrv_driver = {
	.name = DRV_NAME,
	.id_table = tdrv_ids,
	.probe = rebalab_testdrv_probe,
	.remove = rebalab_testdrv_remove,
};

static int __init tdrv_init(void)
{
	pr_info("loaded: bug=%s slow_ms=%d timeout_ms=%d\n", bug_names[bug_mode], slow_ms, timeout_ms);
	return pci_register_driver(&tdrv_driver);
}

static void __exit tdrv_exit(void)
{
	pci_unregister_driver(&tdrv_driver);
	ida_destroy(&tdrv_ida);
	pr_info("unloaded\n");
}

module_init(tdrv_init);
module_exit(tdrv_exit);

MODULE_DESCRIPTION("rebalab test driver for QEMU's edu device, with planted PnP bugs");
MODULE_AUTHOR("rebalab");
MODULE_LICENSE("GPL");
