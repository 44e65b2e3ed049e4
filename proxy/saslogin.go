package proxy

import (
	"errors"

	"github.com/emersion/go-sasl"
)

// loginServer is the server side of the obsolete but still common LOGIN
// SASL mechanism (draft-murchison-sasl-login), which go-sasl implements
// only as a client. Outlook and older Thunderbird builds still use it.
type loginServer struct {
	step     int
	user     string
	validate func(user, pass string) error
}

func newLoginServer(validate func(user, pass string) error) sasl.Server {
	return &loginServer{validate: validate}
}

func (s *loginServer) Next(response []byte) ([]byte, bool, error) {
	switch s.step {
	case 0:
		s.step++
		if response == nil {
			return []byte("Username:"), false, nil
		}
		fallthrough // initial response carries the user name
	case 1:
		s.user = string(response)
		s.step = 2
		return []byte("Password:"), false, nil
	case 2:
		s.step++
		return nil, true, s.validate(s.user, string(response))
	}
	return nil, true, errors.New("LOGIN: unexpected response")
}
