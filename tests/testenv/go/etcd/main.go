// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 for the
// ShCR test environment (no prebuilt binaries can be downloaded here).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
