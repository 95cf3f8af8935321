// Package drive runs a load generator's requests from several goroutines
// for a fixed time and reports what they did as one JSON line: the count
// (under the caller's name), errors, and the p50/p99 latency of the
// successful ones. Standard library only (no module proxy here).
package drive

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"time"
)

// rate paces the requests: at most this many per second in all, spread
// evenly over the workers (0: each worker sends as soon as its last
// answer came, which saturates the server). A paced server has idle time,
// so its CPU per request is its work, not one core divided by whatever
// throughput the machine allowed that round.
var rate = flag.Float64("rate", 0, "requests per second in all (0: as fast as answered)")

// Run calls do(worker, i) from `workers` goroutines until `duration` has
// passed, prints {"<name>":N,"errors":E,"seconds":S,"p50_ms":..,"p99_ms":..}
// and exits non-zero when every request failed.
func Run(name string, workers int, duration time.Duration, do func(w, i int) error) {
	deadline := time.Now().Add(duration)
	var mu sync.Mutex
	var lat []time.Duration
	errors := 0
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			var mine []time.Duration
			bad := 0
			for i := 0; time.Now().Before(deadline); i++ {
				if *rate > 0 {
					// Worker w's i-th request is due at its slot in one
					// even schedule over all workers; a late one goes at once.
					due := start.Add(time.Duration((float64(i*workers+w) / *rate) * float64(time.Second)))
					if d := time.Until(due); d > 0 {
						time.Sleep(d)
					}
					if !time.Now().Before(deadline) {
						break
					}
				}
				t0 := time.Now()
				if err := do(w, i); err != nil {
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
		name: len(lat), "errors": errors, "seconds": duration.Seconds(),
		"p50_ms": q(0.50), "p99_ms": q(0.99),
	})
	fmt.Println(string(out))
	if errors > 0 && len(lat) == 0 {
		os.Exit(1)
	}
}

// Status turns a non-2xx answer into an error.
func Status(code int) error {
	if code/100 != 2 {
		return fmt.Errorf("HTTP %d", code)
	}
	return nil
}
