# shellcheck shell=bash
# e2e/node/real-node.sh — sourced by e2e/cluster for `up --nodes real`: one real Kubernetes node
# on this machine, so Corvid's images run as real pods. Everything comes from Debian packages
# (containerd, runc, containernetworking-plugins, iptables) or is built from Go modules (kubelet,
# kube-proxy, CoreDNS); the images are imported from OCI archives, never pulled.
#
# Network: a bridge ($NODE_BRIDGE, $NODE_SUBNET) created here; the host is its gateway
# ($NODE_IP) and runs the apiserver, kubelet and CoreDNS on that address. The CNI bridge plugin
# plugs pods into it with host-local IPAM and no IP masquerade: traffic stays on the bridge and
# loopback. kube-proxy (iptables) makes ClusterIPs work from pods and from the host.

NODE_DIR=$STATE/node
CONTAINERD_SOCK=$NODE_DIR/containerd.sock
IMAGES_DIR=${CORVID_E2E_IMAGES:-$(cd "$E2E_SRC/.." && pwd)/target/images}
PAUSE_IMAGE=corvid.local/pause:3.10
KUBELET_HEALTHZ_PORT=16248
KUBE_PROXY_HEALTHZ_PORT=16256
KUBE_PROXY_METRICS_PORT=16249
COREDNS_HEALTH_PORT=16281
COREDNS_READY_PORT=16282

node_ctr() { ctr --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }

node_prereqs() {
  need_cmd containerd containerd
  need_cmd runc runc
  need_cmd iptables iptables
  need_cmd conntrack conntrack
  need_cmd ip iproute2
  need_cmd gcc gcc
  need_cmd findmnt util-linux
  [[ -x /usr/lib/cni/bridge ]] || need_cmd /usr/lib/cni/bridge containernetworking-plugins
  [[ $(id -u) == 0 ]] || die "--nodes real needs root (bridge, iptables, mounts, cgroups)"
}

setup_network() {
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 || ip link add "$NODE_BRIDGE" type bridge
  ip addr replace "$NODE_IP/${NODE_SUBNET#*/}" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  # Pod -> ClusterIP -> pod is routed through the host; a pod answering a pod on the same
  # bridge must pass iptables too, or replies skip the DNAT's conntrack entry.
  sysctl -qw net.ipv4.ip_forward=1
  [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter 2>/dev/null ||
    die "bridge netfilter (br_netfilter) is not available on this kernel"
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
}

write_node_configs() {
  mkdir -p "$NODE_DIR/cni/net.d" "$NODE_DIR/cni/ipam"
  # restrict_oom_score_adj: this VM lacks CAP_SYS_RESOURCE; without it runc fails with "can't
  # get final child's PID from pipe: EOF" when a container asks for a lower OOM score.
  cat >"$NODE_DIR/containerd.toml" <<EOF
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_DIR/containerd/state"
[grpc]
  address = "$CONTAINERD_SOCK"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni/net.d"
EOF
  cat >"$NODE_DIR/cni/net.d/10-corvid-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "corvid-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$NODE_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$NODE_SUBNET", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$NODE_DIR/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

start_containerd() {
  write_node_configs
  start containerd --config "$NODE_DIR/containerd.toml"
  wait_until containerd "containerd answers on $CONTAINERD_SOCK" 30 node_ctr version
}

# The sandbox image is built from e2e/node/pause.c (no registry to pull registry.k8s.io/pause
# from); Corvid's images come from scripts/build-images. Kubernetes asks for image names in their
# normalised form (docker.io/corvid/corvid-broker:0.1.0), so each short name gets that alias.
import_images() {
  local pause_tar=$NODE_DIR/pause.tar
  if [[ ! -s $pause_tar || $E2E_SRC/node/pause.c -nt $pause_tar ]]; then
    gcc -Os -static -o "$NODE_DIR/pause" "$E2E_SRC/node/pause.c"
    strip "$NODE_DIR/pause"
    "$E2E_SRC/../scripts/oci-archive" --out "$pause_tar" --ref "$PAUSE_IMAGE" \
      --file "/pause=$NODE_DIR/pause:0755" --user 65535:65535 --entrypoint /pause >/dev/null
  fi
  node_ctr images import "$pause_tar" >/dev/null
  local tar found=0
  for tar in "$IMAGES_DIR"/*.tar; do
    [[ -e $tar ]] || continue
    node_ctr images import "$tar" >/dev/null
    found=1
  done
  ((found)) || log "WARNING: no image archives in $IMAGES_DIR (run scripts/build-images); only the pause image is on the node"
  local name
  for name in $(node_ctr images ls -q | grep -v '^sha256:'); do
    normalised_image_name "$name" >/dev/null || continue
    node_ctr images tag --force "$name" "$(normalised_image_name "$name")" >/dev/null
  done
  log "images on the node: $(node_ctr images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
}

# Prints the docker.io form of a short image name; fails when the name is already qualified.
normalised_image_name() { # <name>
  local first=${1%%/*}
  [[ $1 == */* && ($first == *.* || $first == *:* || $first == localhost) ]] && return 1
  [[ $1 == */* ]] && { echo "docker.io/$1"; return 0; }
  echo "docker.io/library/$1"
}

node_ready() {
  [[ $(kubectl_admin get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

start_kubelet() {
  local client_ext=("basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment"
    "extendedKeyUsage=clientAuth")
  issue_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "${client_ext[@]}"
  issue_cert kubelet-serving "/CN=$NODE_NAME" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:$NODE_IP,DNS:$NODE_NAME"
  write_kubeconfig "$STATE/kubelet.kubeconfig" kubelet
  mkdir -p "$NODE_DIR/kubelet"
  : >"$NODE_DIR/resolv.conf" # pods resolve through cluster DNS only; the sandbox is offline
  # failCgroupV1: this VM has cgroup v1. oomScoreAdj 0: no CAP_SYS_RESOURCE to lower it.
  # Eviction and image GC thresholds are relaxed: a developer's disk is not a node's, and the
  # imported images cannot be pulled again once collected.
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
oomScoreAdj: 0
failSwapOn: false
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: $NODE_DIR/resolv.conf
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
maxPods: 110
EOF
  start kubelet --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$STATE/kubelet.kubeconfig" \
    --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --root-dir "$NODE_DIR/kubelet" \
    --node-labels "topology.kubernetes.io/zone=zone-0,corvid.dev/e2e-node=real"
  wait_until kubelet "node $NODE_NAME is Ready" 180 node_ready
}

start_kube_proxy() {
  local client_ext=("basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment"
    "extendedKeyUsage=clientAuth")
  issue_cert kube-proxy "/CN=system:kube-proxy" "${client_ext[@]}"
  write_kubeconfig "$STATE/kube-proxy.kubeconfig" kube-proxy
  # conntrack sizing off: the sysctls belong to the host, not to this test node.
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $NODE_SUBNET
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
nodePortAddresses: [$NODE_IP/32]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  start kube-proxy --config "$NODE_DIR/kube-proxy.yaml"
  wait_until kube-proxy "kube-proxy programmed the Services" 60 \
    curl -fsS --max-time 3 "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"
}

start_coredns() {
  local client_ext=("basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment"
    "extendedKeyUsage=clientAuth")
  issue_cert coredns "/CN=corvid-e2e-coredns" "${client_ext[@]}"
  write_kubeconfig "$STATE/coredns.kubeconfig" coredns
  kubectl_admin create clusterrolebinding corvid-e2e-coredns --clusterrole view \
    --user corvid-e2e-coredns --dry-run=client -o yaml | kubectl_admin apply -f - >/dev/null
  # No `forward`: the sandbox has no upstream resolver; only cluster names resolve.
  cat >"$NODE_DIR/Corefile" <<EOF
.:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:$COREDNS_HEALTH_PORT
    ready 127.0.0.1:$COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $STATE/coredns.kubeconfig corvid-e2e
        pods insecure
        ttl 5
    }
    cache 5
}
EOF
  start coredns -conf "$NODE_DIR/Corefile"
  wait_until coredns "CoreDNS serves cluster.local on $NODE_IP:53" 60 \
    curl -fsS --max-time 3 "http://127.0.0.1:$COREDNS_READY_PORT/ready"
}

start_real_node() {
  start_containerd
  import_images
  start_kubelet
  start_kube_proxy
  start_coredns
  wait_until kube-controller-manager "default service account exists" 60 \
    kubectl_admin -n default get serviceaccount default
}

# Containers outlive the kubelet and containerd (their shims keep them), so `down` kills every
# task in the node's namespace, unmounts what the node mounted and removes its iptables rules.
stop_real_node() {
  stop coredns kube-proxy kubelet
  if [[ -n $(running_pid containerd) ]]; then
    local id deadline
    for id in $(node_ctr tasks ls -q 2>/dev/null); do
      node_ctr tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    deadline=$((SECONDS + 20))
    while node_ctr tasks ls 2>/dev/null | awk 'NR > 1 && $3 != "STOPPED"' | grep -q . &&
      ((SECONDS < deadline)); do sleep 0.2; done
    for id in $(node_ctr tasks ls -q 2>/dev/null); do node_ctr tasks delete "$id" >/dev/null 2>&1 || true; done
    for id in $(node_ctr containers ls -q 2>/dev/null); do node_ctr containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop containerd
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $CONTAINERD_SOCK" 2>/dev/null || true
  local m
  for m in $(findmnt -rn -o TARGET | grep -F "$NODE_DIR/" | sort -r); do umount -l "$m" 2>/dev/null || true; done
  for m in $(ip netns list 2>/dev/null | awk '/^cni-/ { print $1 }'); do
    ip netns pids "$m" 2>/dev/null | grep -q . || ip netns delete "$m" 2>/dev/null || true
  done
  [[ -x $(bin_path kube-proxy) ]] && "$(bin_path kube-proxy)" --cleanup >/dev/null 2>&1 || true
  local table
  for table in nat filter mangle; do # the kubelet's canary chains
    iptables -t "$table" -X KUBE-KUBELET-CANARY 2>/dev/null || true
  done
  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 && ip link delete "$NODE_BRIDGE" 2>/dev/null || true
  # Pod state belongs to the etcd keyspace that `up` wipes; the image store is kept.
  rm -rf "$NODE_DIR/kubelet" "$NODE_DIR/cni/ipam"
}
