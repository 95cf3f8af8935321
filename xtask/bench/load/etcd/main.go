// etcd-load: puts through etcd's JSON gateway from many goroutines for a
// fixed time, then prints one JSON line: {"puts":N,"errors":E,"p50_ms":..,
// "p99_ms":..}.
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"time"

	"watchscope.dev/bench/load/internal/drive"
)

func main() {
	endpoint := flag.String("endpoint", "http://127.0.0.1:2379", "etcd client URL")
	workers := flag.Int("workers", 16, "concurrent clients")
	duration := flag.Duration("duration", 5*time.Second, "how long to put")
	prefix := flag.String("prefix", "/bench/", "key prefix")
	size := flag.Int("value-bytes", 256, "value size")
	flag.Parse()

	value := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte("x"), *size))
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: *workers}}
	drive.Run("puts", *workers, *duration, func(w, i int) error {
		key := base64.StdEncoding.EncodeToString([]byte(fmt.Sprintf("%sw%d/k%d", *prefix, w, i%100)))
		body, _ := json.Marshal(map[string]string{"key": key, "value": value})
		resp, err := client.Post(*endpoint+"/v3/kv/put", "application/json", bytes.NewReader(body))
		if err != nil {
			return err
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return drive.Status(resp.StatusCode)
	})
}
