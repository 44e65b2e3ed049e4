package proxy

import (
	"context"
	"net"
	"time"

	"github.com/emersion/go-smtp"
)

// DialReinject opens an SMTP session with Postfix's replay service (see
// docs/operations.md, "Replay through Postfix") as the client a front-door
// submission came from: XCLIENT (https://www.postfix.org/XCLIENT_README.html)
// gives Postfix the client's address and HELO name as the front door
// recorded them, so its restrictions judge the original client again.
// client is DeliveryArgs.Client ("ip:port"); one that does not parse is
// left out and Postfix sees undomail's own address.
func DialReinject(ctx context.Context, addr, client, helo, localName string, timeout time.Duration) (*smtp.Client, error) {
	ci := clientInfo{helo: helo}
	if ta, err := net.ResolveTCPAddr("tcp", client); err == nil && ta.IP != nil {
		ci.addr = ta
	}
	d := dialer{addr: addr, timeout: timeout, xclient: true, localName: localName}
	return d.dial(ctx, ci)
}
