"""The GET forms of the reports and the audit page: a date range, the audit's filters.

Bad input never fails a page: the form says what is wrong and the page shows the
default range meanwhile.
"""

from __future__ import annotations

from django import forms

from conversations import reports
from conversations.models import AuditEntry


class RangeForm(forms.Form):
    start = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self):
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if start and end:
            if start > end:
                raise forms.ValidationError("The range starts after it ends: swap the two dates.")
            if (end - start).days + 1 > reports.MAX_RANGE_DAYS:
                raise forms.ValidationError(f"A report covers at most {reports.MAX_RANGE_DAYS} days.")
        return data

    def period(self) -> reports.Range:
        """The range asked for; the default (the last 7 days) for what is missing or wrong."""
        default = reports.default_range()
        if not self.is_valid():
            return default
        end = self.cleaned_data.get("end") or default.last
        start = self.cleaned_data.get("start") or end - (default.last - default.first)
        return reports.Range(first=min(start, end), last=end)


class FigureForm(RangeForm):
    """The conversations behind one figure of the report."""

    show = forms.ChoiceField(choices=[(key, key) for key in sorted(reports.LIST_FIGURES)], required=False)
    operator = forms.IntegerField(required=False, min_value=1)
    bucket = forms.IntegerField(required=False, min_value=0, max_value=len(reports.WAIT_BUCKETS) - 1)
    at = forms.DateTimeField(required=False)
    before = forms.IntegerField(required=False, min_value=1)


class AuditForm(RangeForm):
    operator = forms.ModelChoiceField(
        queryset=reports.audit_people(), required=False, empty_label="Anyone",
    )
    action = forms.ChoiceField(choices=[("", "Any action"), *AuditEntry.Action.choices], required=False)
    outcome = forms.ChoiceField(choices=[("", "Any outcome"), *AuditEntry.Outcome.choices], required=False)
    before = forms.IntegerField(required=False, min_value=1, widget=forms.HiddenInput)

    def clean(self):
        # The audit's days are optional on both ends; only their order is checked.
        data = forms.Form.clean(self)
        start, end = data.get("start"), data.get("end")
        if start and end and start > end:
            raise forms.ValidationError("The range starts after it ends: swap the two dates.")
        return data

    def audit_filter(self) -> reports.AuditFilter:
        if not self.is_valid():
            return reports.AuditFilter()
        data = self.cleaned_data
        return reports.AuditFilter(
            operator_id=data["operator"].pk if data.get("operator") else None,
            action=data.get("action") or "",
            outcome=data.get("outcome") or "",
            first=data.get("start"),
            last=data.get("end"),
        )
