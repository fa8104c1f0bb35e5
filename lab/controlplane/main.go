// Command controlplane is the lab's real Kubernetes control plane: etcd, kube-apiserver
// and kube-controller-manager from the Kubernetes Go modules, in one binary with one
// subcommand per component. Each component runs as its own process (`up` spawns this
// binary once per component): two components in one process would share global flags,
// feature gates and metrics registries.
//
// It exists for the project's test world only and is never shipped.
package main

import (
	"fmt"
	"os"
	_ "time/tzdata" // as upstream's mains: CronJob time zones

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json, as upstream
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric, as upstream
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	kcm "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

const usage = `usage: controlplane COMMAND [flags]

commands:
  up --dir D [--bind 127.0.0.1] [--port N]   run etcd, kube-apiserver and
     [--owner-pid P] [--remove-dir]          kube-controller-manager under D (stop
                                             when P is gone; remove D after stopping)
  etcd --dir D [--listen-client URL] [--listen-peer URL]
  kube-apiserver [flags]                     upstream kube-apiserver
  kube-controller-manager [flags]            upstream kube-controller-manager
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "up":
		exit(runUp(args))
	case "etcd":
		exit(runEtcd(args))
	case "kube-apiserver":
		cmd := apiserver.NewAPIServerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "kube-controller-manager":
		cmd := kcm.NewControllerManagerCommand()
		cmd.SetArgs(args)
		os.Exit(cli.Run(cmd))
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
}

func exit(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "controlplane:", err)
		os.Exit(1)
	}
	os.Exit(0)
}
