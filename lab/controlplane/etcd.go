package main

import (
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

// runEtcd runs a one-member etcd in this process until SIGTERM/SIGINT.
func runEtcd(args []string) error {
	fs := flag.NewFlagSet("etcd", flag.ExitOnError)
	dir := fs.String("dir", "", "data directory (required)")
	client := fs.String("listen-client", "http://127.0.0.1:2379", "client URL (loopback only)")
	peer := fs.String("listen-peer", "http://127.0.0.1:2380", "peer URL (loopback only)")
	// The lab's data is disposable; skipping fsync keeps a 2-core box with a busy disk
	// from stalling the API server on etcd's WAL.
	noFsync := fs.Bool("unsafe-no-fsync", true, "skip fsync (lab data is disposable)")
	_ = fs.Parse(args)
	if *dir == "" {
		return fmt.Errorf("etcd: --dir is required")
	}
	cu, err := loopbackURL(*client)
	if err != nil {
		return err
	}
	pu, err := loopbackURL(*peer)
	if err != nil {
		return err
	}

	cfg := embed.NewConfig()
	cfg.Name = "lab"
	cfg.Dir = *dir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = *noFsync
	cfg.LogLevel = "warn"

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		fmt.Fprintf(os.Stderr, "etcd ready on %s\n", cu)
	case <-time.After(60 * time.Second):
		return fmt.Errorf("etcd: not ready after 60s")
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case s := <-sig:
		fmt.Fprintf(os.Stderr, "etcd: %s, stopping\n", s)
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcd: %w", err)
	}
}

// loopbackURL refuses anything but a loopback host: the lab must never listen beyond
// this machine.
func loopbackURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	h := u.Hostname()
	if ip := net.ParseIP(h); h != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return nil, fmt.Errorf("%s: only loopback addresses are allowed", s)
	}
	return u, nil
}
