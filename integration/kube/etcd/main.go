// etcd for the test cluster: the server module's own entry point (the etcd command module has
// replace directives, so it cannot be built from the module proxy; its main only calls this).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
