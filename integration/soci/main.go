// Command clip-bench-soci runs the SOCI snapshotter (github.com/awslabs/soci-snapshotter, the
// version go.mod pins) for clip's cold-start benchmark, the way SOCI's own two programs do:
//
//	clip-bench-soci serve   -address SOCK -root DIR -config TOML     (soci-snapshotter-grpc)
//	clip-bench-soci convert -address CONTAINERD_SOCK -namespace NS [-span-size N] [-min-layer-size N] SRC DST
//	                                                                 (soci convert: SOCI index manifest v2)
//
// SOCI's command module (github.com/awslabs/soci-snapshotter/cmd) is not served by the Go module
// proxy, its library is; so these are thin mains of our own over the library's entry points
// (service.NewSociSnapshotterService, soci.NewIndexBuilder(...).Convert), with SOCI's defaults.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"

	"github.com/awslabs/soci-snapshotter/config"
	socifs "github.com/awslabs/soci-snapshotter/fs"
	"github.com/awslabs/soci-snapshotter/metadata"
	"github.com/awslabs/soci-snapshotter/service"
	"github.com/awslabs/soci-snapshotter/service/keychain/dockerconfig"
	"github.com/awslabs/soci-snapshotter/soci"
	"github.com/awslabs/soci-snapshotter/soci/store"
	"github.com/awslabs/soci-snapshotter/ztoc"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: clip-bench-soci serve|convert ...")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "convert":
		err = convert(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "clip-bench-soci %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// serve is soci-snapshotter-grpc: the snapshotter on a unix socket until SIGINT (unmounts) or SIGTERM.
func serve(args []string) error {
	fl := flag.NewFlagSet("serve", flag.ExitOnError)
	address := fl.String("address", "", "unix socket to serve on")
	root := fl.String("root", "", "snapshotter root")
	cfgPath := fl.String("config", "", "SOCI config.toml")
	level := fl.String("log-level", "info", "log level")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if err := log.SetLevel(*level); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cfg, err := config.NewConfigFromToml(*cfgPath)
	if err != nil {
		return err
	}
	if err := service.Supported(*root); err != nil {
		return fmt.Errorf("snapshotter not supported: %w", err)
	}
	db, err := bolt.Open(filepath.Join(*root, "metadata.db"), 0600, &bolt.Options{
		NoFreelistSync: true, InitialMmapSize: 64 << 20, FreelistType: bolt.FreelistMapType,
	})
	if err != nil {
		return err
	}
	var mt metadata.Store = func(sr *io.SectionReader, toc ztoc.TOC, opts ...metadata.Option) (metadata.Reader, error) {
		return metadata.NewReader(db, sr, toc, opts...)
	}
	sn, err := service.NewSociSnapshotterService(ctx, *root, &cfg.ServiceConfig,
		service.WithCredsFuncs(dockerconfig.NewDockerConfigKeychain(ctx)),
		service.WithFilesystemOptions(socifs.WithMetadataStore(mt)))
	if err != nil {
		return err
	}
	rpc := grpc.NewServer(grpc.ChainUnaryInterceptor(namespaceInterceptor))
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	if err := os.RemoveAll(*address); err != nil {
		return err
	}
	l, err := net.Listen("unix", *address)
	if err != nil {
		return err
	}
	errCh := make(chan error, 1)
	go func() { errCh <- rpc.Serve(l) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, unix.SIGINT, unix.SIGTERM)
	select {
	case s := <-sig:
		rpc.Stop()
		if s == unix.SIGINT {
			return sn.Close()
		}
		return nil
	case err := <-errCh:
		return err
	}
}

// namespaceInterceptor copies the namespace containerd sends in the incoming metadata to the
// outgoing one, as containerd's own servers do.
func namespaceInterceptor(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
	if ns, ok := namespaces.Namespace(ctx); ok {
		ctx = namespaces.WithNamespace(ctx, ns)
	}
	return h(ctx, req)
}

// convert is `soci convert`: SRC (in containerd's image store) gets zTOCs and a SOCI index
// manifest v2, the result is stored as image DST, ready for `ctr images push`.
func convert(args []string) error {
	fl := flag.NewFlagSet("convert", flag.ExitOnError)
	address := fl.String("address", "", "containerd socket")
	ns := fl.String("namespace", "default", "containerd namespace")
	spanSize := fl.Int64("span-size", 1<<22, "span size (SOCI's default: 4 MiB)")
	minLayerSize := fl.Int64("min-layer-size", 10<<20, "smallest layer that gets a zTOC (SOCI's default: 10 MiB)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() != 2 {
		return errors.New("usage: convert [flags] SRC DST")
	}
	src, dst := fl.Arg(0), fl.Arg(1)
	client, err := containerd.New(*address)
	if err != nil {
		return err
	}
	defer client.Close()
	ctx := namespaces.WithNamespace(context.Background(), *ns)
	is := client.ImageService()
	img, err := is.Get(ctx, src)
	if err != nil {
		return err
	}
	blobs, err := store.NewContentStore(store.WithType(store.ContainerdContentStoreType),
		store.WithContainerdAddress(*address))
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "soci-artifacts-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	db, err := soci.NewDB(soci.ArtifactsDbPath(tmp))
	if err != nil {
		return err
	}
	b, err := soci.NewIndexBuilder(client.ContentStore(), blobs, soci.WithSpanSize(*spanSize),
		soci.WithMinLayerSize(*minLayerSize), soci.WithArtifactsDb(db), soci.WithBuildToolIdentifier("clip-bench-soci"))
	if err != nil {
		return err
	}
	bctx, done, err := blobs.BatchOpen(ctx)
	if err != nil {
		return err
	}
	defer done(ctx)
	desc, err := b.Convert(bctx, img, soci.ConvertWithNoGarbageCollectionLabels())
	if err != nil {
		return err
	}
	out := images.Image{Name: dst, Target: *desc}
	if _, err := is.Create(ctx, out); errdefs.IsAlreadyExists(err) {
		_, err = is.Update(ctx, out)
		return err
	} else {
		return err
	}
}
