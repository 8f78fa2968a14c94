# benches/setup.sh: sourced by benches/profile.sh and benches/threads.sh. Writes the fixed
# backend (nginx `return 200 "ok"`, keep-alive without limits) and the edge-router config
# that proxies to it, as benches/compare.sh sets them up. Loopback only.
#   write_backend_conf DIR PORT            -> DIR/nginx.conf
#   write_edge_toml FILE PORT ADMIN BACKEND
write_backend_conf() {
  cat >"$1/nginx.conf" <<NG
worker_processes 1; daemon off; pid $1/nginx.pid; error_log $1/error.log;
events { worker_connections 4096; }
http { access_log off; default_type text/plain;
  client_body_temp_path $1/cb; proxy_temp_path $1/p; fastcgi_temp_path $1/f; uwsgi_temp_path $1/u; scgi_temp_path $1/s;
  keepalive_requests 1000000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:$2 backlog=4096; location / { return 200 "ok"; } } }
NG
}

write_edge_toml() {
  cat >"$1" <<TOML
[listener]
address = "127.0.0.1:$2"
access_log = false
[admin]
address = "127.0.0.1:$3"
[locality]
region = "local"
zone = "local-a"
[[cluster]]
name = "backend"
[cluster.health_check]
path = "/healthz"
interval = "1s"
timeout = "500ms"
healthy_threshold = 1
unhealthy_threshold = 2
[[cluster.endpoint]]
address = "127.0.0.1:$4"
region = "local"
zone = "local-a"
[[route]]
path_prefix = "/"
cluster = "backend"
TOML
}
