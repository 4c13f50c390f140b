// The clip-snapshotter daemon of one conformance sub-test, for both suites (containerd 1.6's in
// this directory, 2.x's in ../conformance2, which builds this file beside its own). Standard
// library only, so it compiles against either containerd.
package conformance

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// startDaemon starts the daemon with its own root and socket beside root and waits until the
// socket answers; stop sends SIGTERM and checks that it exits cleanly.
func startDaemon(bin, root string) (sock string, stop func() error, err error) {
	sock = filepath.Join(filepath.Dir(root), "clip.sock")
	logPath := filepath.Join(filepath.Dir(filepath.Dir(root)), filepath.Base(filepath.Dir(root))+".clip.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return "", nil, err
	}
	cmd := exec.Command(bin, "--root", root, "--address", sock, "--log-level", "debug")
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return "", nil, err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop = func() error {
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
			return sock, stop, nil
		}
		select {
		case err := <-exited:
			logFile.Close()
			return "", nil, fmt.Errorf("clip-snapshotter exited before serving: %v (log %s)", err, logPath)
		default:
		}
		if time.Now().After(deadline) {
			_ = stop()
			return "", nil, fmt.Errorf("clip-snapshotter did not serve %s within 20 s (log %s)", sock, logPath)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cleanupThenStop is a sub-test's cleanup: the snapshotter's Cleanup on whatever the test left
// behind (nil when the proxy has none), then the connection closed and the daemon stopped.
func cleanupThenStop(cleanup func(context.Context) error, closeConn func() error, stop func() error) func() error {
	return func() error {
		var cleanupErr error
		if cleanup != nil {
			cctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			cleanupErr = cleanup(cctx)
			cancel()
		}
		closeConn()
		if err := stop(); err != nil {
			return err
		}
		if cleanupErr != nil {
			return fmt.Errorf("Cleanup call failed: %w", cleanupErr)
		}
		return nil
	}
}
