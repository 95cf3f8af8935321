module watchscope.dev/bench/etcdload

go 1.19
