module watchscope.dev/bench/load

go 1.19
