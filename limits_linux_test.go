// limits_linux_test.go checks, with Linux's socket options, that WebSocket
// connections keep the TCP keepalive of the listener that accepted them.
package main

import (
	"net/http/httptest"
	"strings"
	"syscall"
	"testing"
)

// TestTCPKeepAlive checks that a connection accepted by listen, as the
// server's own, has TCP keepalive on with the stated timing after it has
// been taken over from net/http for the WebSocket.
func TestTCPKeepAlive(t *testing.T) {
	srv, err := newServer(testConfig(), testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewUnstartedServer(srv.handler())
	hs.Listener.Close()
	hs.Listener = ln
	hs.Start()
	ts := &testServer{server: srv, http: hs, url: "ws" + strings.TrimPrefix(hs.URL, "http") + "/v1", cfg: testConfig()}
	t.Cleanup(ts.stop)

	c, _ := ts.dial(t)
	sc := ts.serverSide(t, c)
	rc, err := tcpConn(sc.netConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for _, opt := range []struct {
		name       string
		level, opt int
		want       int
	}{
		{"SO_KEEPALIVE", syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
		{"TCP_KEEPIDLE", syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, int(tcpKeepAliveIdle.Seconds())},
		{"TCP_KEEPINTVL", syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, int(tcpKeepAliveInterval.Seconds())},
		{"TCP_KEEPCNT", syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, tcpKeepAliveCount},
	} {
		var got int
		var gerr error
		if err := rc.Control(func(fd uintptr) { got, gerr = syscall.GetsockoptInt(int(fd), opt.level, opt.opt) }); err != nil {
			t.Fatal(err)
		}
		if gerr != nil || got != opt.want {
			t.Errorf("%s = %d (%v), want %d", opt.name, got, gerr, opt.want)
		}
	}
}
