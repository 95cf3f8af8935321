// etcd-load: puts through etcd's JSON gateway from many goroutines for a
// fixed time, then prints one JSON line: {"puts":N,"seconds":S,"p50_ms":..,
// "p99_ms":..}. Standard library only (no module proxy here).
package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"net/http"
	"os"
	"sort"
	"sync"
	"time"
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
	deadline := time.Now().Add(*duration)
	var mu sync.Mutex
	var lat []time.Duration
	errors := 0
	var wg sync.WaitGroup
	for w := 0; w < *workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			for i := 0; time.Now().Before(deadline); i++ {
				key := base64.StdEncoding.EncodeToString([]byte(fmt.Sprintf("%sw%d/k%d", *prefix, w, i%100)))
				body, _ := json.Marshal(map[string]string{"key": key, "value": value})
				t0 := time.Now()
				resp, err := client.Post(*endpoint+"/v3/kv/put", "application/json", bytes.NewReader(body))
				if err != nil {
					bad++
					continue
				}
				_, _ = bytes.NewBuffer(nil).ReadFrom(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					bad++
					continue
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			errors += bad
			mu.Unlock()
		}(w)
	}
	wg.Wait()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	q := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000
	}
	out, _ := json.Marshal(map[string]any{
		"puts": len(lat), "errors": errors, "seconds": duration.Seconds(),
		"p50_ms": q(0.50), "p99_ms": q(0.99),
	})
	fmt.Println(string(out))
	if errors > 0 && len(lat) == 0 {
		os.Exit(1)
	}
}
