// Package conformance runs containerd 2.x's own snapshotter test suite
// (core/snapshots/testsuite.SnapshotterSuite) against clip-snapshotter, through containerd's
// snapshots proxy client dialing the daemon's unix socket, exactly as containerd does with a
// [proxy_plugins] entry. Every sub-test starts its own daemon with its own root and socket.
//
// Built in module mode against the containerd version of integration/go-tools.env by
// integration/install-deps.sh (go.mod and go.sum beside this file pin it); run by
// integration/tests/conformance.rs; CLIP_SNAPSHOTTER_BIN names the daemon binary.
package conformance

import (
	"context"
	"os"
	"testing"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
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
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
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
