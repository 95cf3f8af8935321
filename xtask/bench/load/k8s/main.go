// k8s-load: merge-patches custom resources through a Kubernetes API server
// from several goroutines (one object each, w<i>, so no conflicts) for a
// fixed time, then prints one JSON line: {"updates":N,"errors":E,
// "p50_ms":..,"p99_ms":..}.
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"watchscope.dev/bench/load/internal/drive"
)

func main() {
	server := flag.String("server", "https://127.0.0.1:6443", "API server URL")
	collection := flag.String("collection", "/apis/ws.example.com/v1/etcdclusters", "the custom resources' collection path")
	cert := flag.String("cert", "", "client certificate (PEM)")
	key := flag.String("key", "", "client key (PEM)")
	workers := flag.Int("workers", 4, "concurrent clients, each patching its own object w<i>")
	duration := flag.Duration("duration", 5*time.Second, "how long to patch")
	flag.Parse()

	pair, err := tls.LoadX509KeyPair(*cert, *key)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:     &tls.Config{Certificates: []tls.Certificate{pair}, InsecureSkipVerify: true},
		MaxIdleConnsPerHost: *workers,
	}}
	drive.Run("updates", *workers, *duration, func(w, i int) error {
		url := fmt.Sprintf("%s%s/w%d", *server, *collection, w)
		req, _ := http.NewRequest("PATCH", url, strings.NewReader(fmt.Sprintf(`{"spec":{"size":%d}}`, i)))
		req.Header.Set("Content-Type", "application/merge-patch+json")
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return drive.Status(resp.StatusCode)
	})
}
