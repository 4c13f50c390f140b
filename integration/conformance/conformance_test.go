// Package conformance runs containerd 1.6's own snapshotter test suite
// (snapshots/testsuite.SnapshotterSuite) against clip-snapshotter, through containerd's
// snapshots proxy client dialing the daemon's unix socket, exactly as containerd does with a
// [proxy_plugins] entry. Every sub-test starts its own daemon with its own root and socket.
//
// Built offline in GOPATH mode from Debian's golang-github-containerd-containerd-dev by
// integration/tests/conformance.rs; CLIP_SNAPSHOTTER_BIN names the daemon binary.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

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
		return startDaemon(bin, root)
	})
}

func startDaemon(bin, root string) (snapshots.Snapshotter, func() error, error) {
	sock := filepath.Join(filepath.Dir(root), "clip.sock")
	logPath := filepath.Join(filepath.Dir(filepath.Dir(root)), filepath.Base(filepath.Dir(root))+".clip.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "--root", root, "--address", sock, "--log-level", "debug")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return nil, nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() error {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case err := <-exited:
			logFile.Close()
			if err != nil {
				return fmt.Errorf("clip-snapshotter did not exit cleanly on SIGTERM: %v (log %s)", err, logPath)
			}
			os.Remove(logPath)
			return nil
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			logFile.Close()
			return fmt.Errorf("clip-snapshotter ignored SIGTERM for 20 s (log %s)", logPath)
		}
	}

	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case err := <-exited:
			logFile.Close()
			return nil, nil, fmt.Errorf("clip-snapshotter exited before serving: %v (log %s)", err, logPath)
		default:
		}
		if time.Now().After(deadline) {
			_ = stop()
			return nil, nil, fmt.Errorf("clip-snapshotter did not serve %s within 20 s (log %s)", sock, logPath)
		}
		time.Sleep(20 * time.Millisecond)
	}
	conn, err := grpc.Dial("unix://"+sock, grpc.WithInsecure())
	if err != nil {
		_ = stop()
		return nil, nil, err
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "clip")
	cleanup := func() error {
		// Exercise Cleanup on whatever each test left behind before stopping.
		var cleanupErr error
		if c, ok := sn.(snapshots.Cleaner); ok {
			cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			cleanupErr = c.Cleanup(cctx)
			cancel()
		}
		conn.Close()
		if err := stop(); err != nil {
			return err
		}
		if cleanupErr != nil {
			return fmt.Errorf("Cleanup call failed: %w", cleanupErr)
		}
		return nil
	}
	return sn, cleanup, nil
}
