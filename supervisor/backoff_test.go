package supervisor

import (
	"testing"
	"time"
)

func TestBackoffDelays(t *testing.T) {
	var b Backoff // the zero value: 100ms doubling to 30s
	want := []time.Duration{0, 100 * time.Millisecond, 200 * time.Millisecond, 400 * time.Millisecond, 800 * time.Millisecond}
	for i, w := range want {
		if got := b.Delay(i); got != w {
			t.Errorf("Delay(%d) = %s, want %s", i, got, w)
		}
	}
	if got := b.Delay(9); got != 25600*time.Millisecond {
		t.Errorf("Delay(9) = %s, want 25.6s", got)
	}
	for _, n := range []int{10, 11, 50, 1 << 20} {
		if got := b.Delay(n); got != 30*time.Second {
			t.Errorf("Delay(%d) = %s, want the 30s cap", n, got)
		}
	}
	custom := Backoff{Initial: time.Second, Max: 3 * time.Second}
	if got := custom.Delay(3); got != 3*time.Second {
		t.Errorf("custom Delay(3) = %s, want 3s", got)
	}
}

func TestRestartLimiter(t *testing.T) {
	l := restartLimiter{max: 3, window: time.Minute}
	t0 := time.Now()
	for i := 0; i < 3; i++ {
		if !l.allow(t0.Add(time.Duration(i) * time.Second)) {
			t.Fatalf("restart %d refused, want allowed", i+1)
		}
	}
	if l.allow(t0.Add(10 * time.Second)) {
		t.Fatal("4th restart within the window allowed, want refused")
	}
	// Once the first restarts leave the window, restarts are allowed again.
	if !l.allow(t0.Add(61 * time.Second)) {
		t.Fatal("restart after the window refused, want allowed")
	}
	var off restartLimiter
	for i := 0; i < 1000; i++ {
		if !off.allow(t0) {
			t.Fatal("zero limiter refused a restart")
		}
	}
}

func TestParsePolicies(t *testing.T) {
	for in, want := range map[string]RestartPolicy{"always": RestartAlways, "on-failure": RestartOnFailure, "never": RestartNever} {
		got, err := ParseRestartPolicy(in)
		if err != nil || got != want || got.String() != in {
			t.Errorf("ParseRestartPolicy(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseRestartPolicy("sometimes"); err == nil {
		t.Error("ParseRestartPolicy(sometimes) succeeded")
	}
	if m, err := ParseReadyMode("message"); err != nil || m != ReadyMessage {
		t.Errorf("ParseReadyMode(message) = %v, %v", m, err)
	}
	if _, err := ParseReadyMode("soon"); err == nil {
		t.Error("ParseReadyMode(soon) succeeded")
	}
}
