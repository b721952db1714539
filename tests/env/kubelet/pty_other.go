//go:build !linux

package main

import (
	"errors"
	"os"
)

func openPTY() (ptm, pts *os.File, err error) {
	return nil, nil, errors.New("tty=true is only supported by talon-kubelet on Linux")
}

func setWinsize(*os.File, uint16, uint16) {}
