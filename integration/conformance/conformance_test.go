// Package conformance runs containerd's own snapshotter test suite
// (testsuite.SnapshotterSuite) against clip-snapshotter, through containerd's snapshots proxy
// client dialing the daemon's unix socket, exactly as containerd does with a [proxy_plugins]
// entry. Every sub-test starts its own daemon with its own root and socket.
//
// One source for both suites: as it stands, containerd 1.6's (built offline in GOPATH mode
// from Debian's golang-github-containerd-containerd-dev by integration/tests/conformance.rs);
// integration/install-deps.sh builds containerd 2.x's from it with the import paths moved to
// github.com/containerd/containerd/v2/core/snapshots (module: integration/conformance2/go.mod).
// CLIP_SNAPSHOTTER_BIN names the daemon binary.
package conformance

import (
	"context"
	"os"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"
)

func TestClipSnapshotter(t *testing.T) {
	bin := os.Getenv("CLIP_SNAPSHOTTER_BIN")
	if bin == "" {
		t.Fatal("CLIP_SNAPSHOTTER_BIN is not set")
	}
	if os.Getuid() != 0 {
		t.Fatal("the snapshotter suite mounts what the daemon returns: run as root")
	}
	testsuite.SnapshotterSuite(t, "clip", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startSnapshotter(bin, root)
	})
}

func startSnapshotter(bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock, stop, err := startDaemon(bin, root)
	if err != nil {
		return nil, nil, err
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "clip")
	var cleanup func(context.Context) error
	if c, ok := sn.(snapshots.Cleaner); ok {
		cleanup = c.Cleanup
	}
	return sn, cleanupThenStop(cleanup, conn.Close, stop), nil
}
