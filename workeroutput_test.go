package main

import (
	"strings"
	"testing"
)

func TestWorkerOutputFlagAndEnvironment(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		args []string
		want workerOutput
	}{
		{nil, nil, outputRaw},
		{nil, []string{"--worker-output", "Prefix"}, outputPrefix},
		{[]string{"SHOAL_WORKER_OUTPUT=json"}, nil, outputJSON},
		{[]string{"SHOAL_WORKER_OUTPUT=json"}, []string{"--worker-output", "raw"}, outputRaw},
	} {
		c, err := parse(t, env(tc.env...), tc.args...)
		if err != nil || c.output != tc.want {
			t.Errorf("%v %v: %v, %v; want %v", tc.env, tc.args, c.output, err, tc.want)
		}
		if hook, resume := outputPipes(c.output, c.logFormat, nil, nil, nil); (hook == nil) != (tc.want == outputRaw) || (resume == nil) != (hook == nil) {
			t.Errorf("%v %v: Output hook set %v, ResumeOutput %v, want both for prefix and json only", tc.env, tc.args, hook != nil, resume != nil)
		}
	}
	_, err := parse(t, env(), "--worker-output", "lines")
	if want := `worker output "lines": want raw, prefix or json`; err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("--worker-output lines: %v, want %q", err, want)
	}
}
